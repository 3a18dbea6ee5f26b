"""Periodic validation: inpaint held-out clips with the published sampler and the model in training.

Every rank inpaints its own validation clips (the UNet is FSDP-sharded, so all ranks call it the
same number of times); the clips are the first positions of the validation split's clip stream, so
every validation sees the same clips and masks. Metrics are averaged over ranks; rank 0 writes
`<run_dir>/validation/step-NNNNNNNN.mp4` (masked input | output | ground truth) and logs the video
and the scalars to TensorBoard.

Metrics: PSNR over the hole pixels, and SSIM of the composited frame (outside the hole the frame is
the ground truth, so differences come from the hole and its surroundings).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fff_vdi.config import ExperimentConfig
from fff_vdi.data.loader import ClipLoader
from fff_vdi.data.shards import load_manifest
from fff_vdi.distributed.env import DistInfo, all_reduce_mean
from fff_vdi.eval.metrics import masked_psnr_per_frame, ssim_per_frame
from fff_vdi.inference.sampler import InpaintSampler
from fff_vdi.inference.video_io import write_mp4
from fff_vdi.train.objective import DTYPES, step_generator

log = logging.getLogger(__name__)


def to_uint8(frames_tchw: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((frames_tchw.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class Validator:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, dist: DistInfo, components):
        self.cfg, self.dist = cfg, dist
        self.out_dir = run_dir / "validation"
        splits = load_manifest(Path(cfg.data.shards))["splits"]
        split = "val" if "val" in splits else cfg.data.split
        if split != "val":
            log.warning("validation: %s has no 'val' split (shard with --val-fraction); validating on '%s' clips",
                        cfg.data.shards, split)
        # Fixed clips: the stream's first positions, one clip per batch, no augmentation.
        self.data_cfg = replace(cfg.data, split=split, batch_size=1, num_workers=0, hflip_prob=0.0,
                                crop_scale=[1.0, 1.0], backend="cpu")
        self.components = components  # the frozen networks as the step's conditioner placed them

    def run(self, unet, step: int, metrics) -> dict:
        t = self.cfg.trainer
        was_training = unet.training
        unet.eval()
        sampler = InpaintSampler(self.components, unet=unet, num_steps=t.val_steps, raft_iters=self.cfg.model.raft_iters,
                                 dtype=DTYPES[self.cfg.parallel.mixed_precision], device=self.dist.device,
                                 fps=self.cfg.objective.fps, motion_bucket_id=self.cfg.objective.motion_bucket_id)
        loader = ClipLoader(self.data_cfg, self.dist.rank, self.dist.world_size, self.dist.device)
        psnrs, ssims = [], []
        try:
            for i in range(t.val_clips):
                batch = next(loader)
                frames, masks = batch["pixel_values"], batch["mask_values"]
                gen = step_generator(t.seed, self.dist.rank, -1, i, self.dist.device)
                output = sampler(frames, masks, gen)
                composite = frames * (1 - masks) + output.to(frames.dtype) * masks
                gt, pred = to_uint8(frames[0]), to_uint8(composite[0])
                holes = masks[0, :, 0].cpu().numpy() > 0.5
                psnrs.append(float(np.nanmean(masked_psnr_per_frame(pred, gt, holes))))
                ssims.append(float(ssim_per_frame(pred, gt).mean()))
                if i == 0 and self.dist.is_main:
                    masked = to_uint8(frames[0] * (1 - masks[0]))
                    side_by_side = np.concatenate([masked, pred, gt], axis=2)
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    write_mp4(self.out_dir / f"step-{step:08d}.mp4", side_by_side, fps=7)
                    metrics.add_video("val/sample", torch.from_numpy(side_by_side).permute(0, 3, 1, 2), step)
        finally:
            loader.close()
            unet.train(was_training)
        values = all_reduce_mean(torch.tensor([np.mean(psnrs), np.mean(ssims)], device=self.dist.device, dtype=torch.float64))
        result = {"psnr_hole": float(values[0]), "ssim": float(values[1])}
        for k, v in result.items():
            metrics.add_scalar(f"val/{k}", v, step)
        log.info("validation at step %d: hole PSNR %.2f dB, SSIM %.4f (%d clips per rank, %d sampler steps)",
                 step, result["psnr_hole"], result["ssim"], t.val_clips, t.val_steps)
        return result
