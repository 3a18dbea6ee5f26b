"""The training data loader of one rank: batches of clips and masks, with exact resume.

    loader = ClipLoader(cfg.data, rank, world_size, device)
    batch = next(loader)      # pixel_values (B,T,3,H,W) in [-1,1], mask_values (B,T,1,H,W) in {0,1}
    state = loader.state_dict()   # saved in the training checkpoint
    loader.load_state_dict(state) # continues exactly there, on any number of ranks

Backends (`data.backend`): "dali" decodes on the GPU (or on the CPU with DALI's CPU operators), "cpu"
decodes with PIL in DataLoader workers; "auto" picks dali on CUDA, else cpu. Both execute the same
plans (sampler.py, plan.py); colour jitter and masks are drawn here, in torch, on the batch's device.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from fff_vdi.config import DataConfig
from fff_vdi.data.clips import ClipSource
from fff_vdi.data.masks import draw_mask
from fff_vdi.data.sampler import RankSlice
from fff_vdi.data.shards import ShardSet
from fff_vdi.errors import DataError

STATE_VERSION = 1


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "dali" if device.type == "cuda" else "cpu"
    return backend


def pixel_values(raw: dict, device: torch.device) -> torch.Tensor:
    """A backend's batch of clips as (B, T, 3, H, W) float32 in [-1, 1] on `device`."""
    if "frames_uint8" in raw:  # CPU backend: (B, T, H, W, 3) uint8
        return raw["frames_uint8"].to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    return raw["frames"].to(device)


def apply_color_jitter(clip_tchw: torch.Tensor, jitter: tuple[float, float, float, float]) -> torch.Tensor:
    """Same brightness/contrast/saturation/hue change on every frame of a [-1, 1] clip."""
    from torchvision.transforms.v2 import functional as TF

    brightness, contrast, saturation, hue = jitter
    x = (clip_tchw + 1) / 2
    x = TF.adjust_brightness(x, brightness)
    x = TF.adjust_contrast(x, contrast)
    x = TF.adjust_saturation(x, saturation)
    x = TF.adjust_hue(x, hue)
    return x.clamp(0, 1) * 2 - 1


class ClipLoader:
    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 split: Optional[str] = None, backend: Optional[str] = None, conditioning=None):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.backend = resolve_backend(backend or cfg.backend, self.device)
        self.shards = ShardSet.open(cfg.shards, split or cfg.split, verify_crc=cfg.verify_crc)
        # A conditioning cache (fff_vdi.conditioning.reader): each batch then also holds its clips' features.
        self.source = ClipSource(self.shards, cfg, conditioning)
        self._start = 0
        self._consumed = 0
        self._batches: Optional[Iterator[dict]] = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Stream position of the next global batch."""
        return self._start + self._consumed * self.world_size * self.cfg.batch_size

    @property
    def epoch(self) -> float:
        return self.position / len(self.source)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.source) // (self.world_size * self.cfg.batch_size))

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "position": self.position, "seed": self.cfg.seed,
                "num_videos": len(self.source), "split": self.shards.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data-loader state version {state.get('version')!r} is not {STATE_VERSION}: "
                            "this checkpoint was written by another version of fff_vdi")
        for key, ours in (("seed", self.cfg.seed), ("num_videos", len(self.source)), ("split", self.shards.split)):
            if state[key] != ours:
                raise DataError(
                    f"the checkpoint's data-loader state has {key}={state[key]!r} but this run has {key}={ours!r}: "
                    "resuming would not continue the same clip stream. Use the same shards and data.seed, or "
                    "start a new run (trainer.resume=none).")
        self.close()
        self._start, self._consumed = int(state["position"]), 0

    # -- iteration -----------------------------------------------------------------------------

    def _open(self) -> Iterator[dict]:
        rank_slice = RankSlice(self.position, self.rank, self.world_size, self.cfg.batch_size)
        self._start, self._consumed = rank_slice.start, 0
        if self.backend == "dali":
            from fff_vdi.data.dali_loader import dali_batches

            return dali_batches(self.source, rank_slice, self.device)
        from fff_vdi.data.cpu_loader import cpu_batches

        return cpu_batches(self.source, rank_slice, self.cfg.num_workers, self.cfg.prefetch,
                           pin_memory=self.device.type == "cuda")

    def __iter__(self) -> "ClipLoader":
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = self._open()
        raw = next(self._batches)
        expected = RankSlice(self._start, self.rank, self.world_size, self.cfg.batch_size).positions(self._consumed)
        if raw["positions"] != expected:
            raise RuntimeError(f"data loader out of order: got positions {raw['positions']}, expected {expected}")
        batch = self._finish(raw)
        self._consumed += 1
        return batch

    def _finish(self, raw: dict) -> dict:
        cfg, device = self.cfg, self.device
        frames = pixel_values(raw, device)
        plans = [self.source.plan(p) for p in raw["positions"]]
        labels = raw.get("labels") or [None] * len(plans)
        clips, masks = [], []
        for plan, clip, lab in zip(plans, frames.unbind(0), labels):
            clips.append(apply_color_jitter(clip, plan.jitter) if plan.jitter is not None else clip)
            masks.append(draw_mask(plan.mask, cfg.height, cfg.width, device, lab))
        videos = [self.source.video(p) for p in plans]
        batch = {
            "pixel_values": torch.stack(clips),
            "mask_values": torch.stack(masks),
            "video_ids": [v.video_id for v in videos],
            "positions": raw["positions"],
            "frame_indices": torch.tensor([p.frame_indices for p in plans]),
            "frame_steps": torch.tensor([p.step for p in plans]),
            "mask_kinds": [p.mask.kind for p in plans],
            "flips": torch.tensor([p.flip for p in plans]),
        }
        if "cached" in raw:  # the clean clips' features, precomputed (objective.CLEAN_FEATURES)
            batch.update(self.source.conditioning.assemble(raw["cached"], device))
        return batch

    def close(self) -> None:
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
