"""Periodic validation: inpaint held-out clips with the published sampler and the model in training.

Every rank inpaints its own validation clips (the UNet is FSDP-sharded, so all ranks call it the
same number of times); the clips are the first positions of the validation split's clip stream, so
every validation sees the same clips and masks. With `trainer.validate_at_start` the model is also
validated before the first step (step 0: the untrained or loaded model, the baseline of the curve).
Metrics are averaged over ranks; rank 0 writes them to TensorBoard and as one JSON line per
validation to `<run_dir>/validation.jsonl`:

  val/hole_psnr_db          PSNR inside the holes against the ground truth, in dB (higher is better)
  val/hole_ssim             SSIM inside the holes (windows weighted by their hole share; 1 = identical)
  val/ewarp_x1e3            flow-warping error of the clips x 10^3 (lower = steadier along the ground
                            truth's motion); flow from `trainer.val_ewarp_flow`: the pipeline's RAFT
                            (the evaluation protocol) or OpenCV's DIS (for a RAFT with random weights)
  val/hole_psnr_vs_vae_db   PSNR inside the holes against the VAE's reconstruction of the ground truth:
                            how close the sampled latents come to the training target (the clip's
                            latents), without the autoencoder's own error
  val/vae_hole_psnr_db      the VAE's reconstruction against the ground truth inside the holes: the
                            most val/hole_psnr_db can reach with this autoencoder (flat over a run)
  val/duration_s            seconds the validation took (rank 0)

The outputs are composited (the input outside the holes), so only the holes differ from the ground
truth. Rank 0 also writes its first clip as `<run_dir>/validation/step-NNNNNNNN.mp4` and as the
TensorBoard video `val/clip0_masked-input_output_ground-truth`: the masked input the model sees
(holes grey), the output, the ground truth, side by side.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fff_vdi.config import DataConfig, ExperimentConfig
from fff_vdi.data.loader import ClipLoader
from fff_vdi.data.shards import load_manifest
from fff_vdi.distributed.env import DistInfo, all_reduce_mean
from fff_vdi.eval.metrics import (
    EWARP_SCALE,
    hole_ssim_per_frame,
    masked_psnr_per_frame,
    warping_error_per_pair,
    warping_error_per_pair_dis,
)
from fff_vdi.inference.sampler import InpaintSampler
from fff_vdi.inference.video_io import write_mp4
from fff_vdi.models.encoders import decode_latents, encode_frames
from fff_vdi.train.objective import DTYPES, step_generator

log = logging.getLogger(__name__)

VIDEO_TAG = "val/clip0_masked-input_output_ground-truth"
PANEL_GAP_PX = 2  # white columns between the three panels of the video


def to_uint8(frames_tchw: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((frames_tchw.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def validation_data_config(data: DataConfig) -> DataConfig:
    """The clips every validation inpaints: the 'val' split of the training shards (the training split
    when there is none), the stream's first positions, one clip per batch, no augmentation."""
    splits = load_manifest(Path(data.shards))["splits"]
    split = "val" if "val" in splits else data.split
    if split != "val":
        log.warning("validation: %s has no 'val' split (shard with --val-fraction); validating on '%s' clips",
                    data.shards, split)
    return replace(data, split=split, batch_size=1, num_workers=0, hflip_prob=0.0, crop_scale=[1.0, 1.0], backend="cpu",
                   conditioning=None)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():  # a clip without any hole gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def composited(frames_tchw: torch.Tensor, masks_t1hw: torch.Tensor, output_tchw: torch.Tensor) -> torch.Tensor:
    """The output inside the holes (masks 1 = hole), the input outside."""
    return torch.where(masks_t1hw > 0.5, output_tchw.to(frames_tchw.device, frames_tchw.dtype), frames_tchw)


def score_inpainting(frames_tchw: torch.Tensor, masks_t1hw: torch.Tensor, output_tchw: torch.Tensor,
                     ewarp_flow: str, raft=None, raft_iters: int = 20) -> dict:
    """hole_psnr_db, hole_ssim and ewarp_x1e3 of one clip (tensors in [-1, 1], masks 1 = hole), with
    the output composited into the input; E_warp's flow on the ground truth from `raft` or DIS."""
    gt = to_uint8(frames_tchw)
    pred = to_uint8(composited(frames_tchw, masks_t1hw, output_tchw))
    holes = (masks_t1hw[:, 0] > 0.5).cpu().numpy()
    if ewarp_flow == "dis":
        ewarp = warping_error_per_pair_dis(pred, gt)
    else:
        ewarp = warping_error_per_pair(pred, gt, raft, raft_iters, frames_tchw.device)
    return {
        "hole_psnr_db": _nanmean(masked_psnr_per_frame(pred, gt, holes)),
        "hole_ssim": _nanmean(hole_ssim_per_frame(pred, gt, holes)),
        "ewarp_x1e3": float(ewarp.mean() * EWARP_SCALE),
    }


def score_against_vae(vae, frames_tchw: torch.Tensor, masks_t1hw: torch.Tensor, output_tchw: torch.Tensor) -> dict:
    """hole_psnr_vs_vae_db and vae_hole_psnr_db of one clip: the output against the VAE's reconstruction
    of the ground truth (decoded from the mode's latents, the mean of the training target), and that
    reconstruction against the ground truth, inside the holes."""
    with torch.no_grad():
        latents = encode_frames(vae, frames_tchw[None], sample=False, scaled=True)
        recon = to_uint8(decode_latents(vae, latents)[0])
    holes = (masks_t1hw[:, 0] > 0.5).cpu().numpy()
    pred = to_uint8(composited(frames_tchw, masks_t1hw, output_tchw))
    return {
        "hole_psnr_vs_vae_db": _nanmean(masked_psnr_per_frame(pred, recon, holes)),
        "vae_hole_psnr_db": _nanmean(masked_psnr_per_frame(recon, to_uint8(frames_tchw), holes)),
    }


def side_by_side(frames_tchw: torch.Tensor, masks_t1hw: torch.Tensor, output_tchw: torch.Tensor) -> np.ndarray:
    """(T, H, 3W + 2 gaps, 3) uint8: masked input | output composited into it | ground truth."""
    panels = [to_uint8(frames_tchw.masked_fill(masks_t1hw > 0.5, 0.0)),
              to_uint8(composited(frames_tchw, masks_t1hw, output_tchw)), to_uint8(frames_tchw)]
    gap = np.full((*panels[0].shape[:2], PANEL_GAP_PX, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=2)


class Validator:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, dist: DistInfo, components):
        self.cfg, self.dist = cfg, dist
        self.out_dir = run_dir / "validation"
        self.data_cfg = validation_data_config(cfg.data)
        self.components = components  # the frozen networks as the step's conditioner placed them

    def run(self, unet, step: int, metrics) -> dict:
        t = self.cfg.trainer
        start = time.perf_counter()
        was_training = unet.training
        unet.eval()
        sampler = InpaintSampler(self.components, unet=unet, num_steps=t.val_steps, raft_iters=self.cfg.model.raft_iters,
                                 dtype=DTYPES[self.cfg.parallel.mixed_precision], device=self.dist.device,
                                 fps=self.cfg.objective.fps, motion_bucket_id=self.cfg.objective.motion_bucket_id)
        loader = ClipLoader(self.data_cfg, self.dist.rank, self.dist.world_size, self.dist.device)
        scores = []
        try:
            for i in range(t.val_clips):
                batch = next(loader)
                frames, masks = batch["pixel_values"], batch["mask_values"]
                gen = step_generator(t.seed, self.dist.rank, -1, i, self.dist.device)
                output = sampler(frames, masks, gen)
                scores.append(self._score(frames[0], masks[0], output[0]))
                if i == 0 and self.dist.is_main:
                    video = side_by_side(frames[0], masks[0], output[0])
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    write_mp4(self.out_dir / f"step-{step:08d}.mp4", video, fps=7)
                    metrics.add_video(VIDEO_TAG, torch.from_numpy(video).permute(0, 3, 1, 2), step)
        finally:
            loader.close()
            unet.train(was_training)
        names = list(scores[0])
        means = torch.tensor([np.mean([s[k] for s in scores]) for k in names], device=self.dist.device, dtype=torch.float64)
        result = dict(zip(names, all_reduce_mean(means).tolist()))
        result["duration_s"] = time.perf_counter() - start
        metrics.add_validation(step, result)
        log.info("validation at step %d: hole PSNR %.2f dB (VAE ceiling %.2f dB, %.2f dB against the VAE's "
                 "reconstruction), hole SSIM %.4f, E_warp %.3f x1e-3 (%d clips per rank, %d sampler steps)",
                 step, result["hole_psnr_db"], result["vae_hole_psnr_db"], result["hole_psnr_vs_vae_db"],
                 result["hole_ssim"], result["ewarp_x1e3"], t.val_clips, t.val_steps)
        return result

    def _score(self, frames: torch.Tensor, masks: torch.Tensor, output: torch.Tensor) -> dict:
        return {**score_inpainting(frames, masks, output, self.cfg.trainer.val_ewarp_flow, self.components.raft,
                                   self.cfg.model.raft_iters),
                **score_against_vae(self.components.vae, frames, masks, output)}
