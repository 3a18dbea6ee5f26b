"""The backend-independent half of the loaders: from a stream position to a plan and encoded bytes.

`ClipSource` is what the reader processes run (DALI's parallel external source or DataLoader
workers): it picks the video for a position, draws the plan, and reads the window's JPEG bytes (and
object annotations, when the plan needs them) by byte offset from the shards. It is picklable and
opens file handles lazily in each process.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from fff_vdi.config import DataConfig
from fff_vdi.data.plan import ClipPlan, is_eligible, plan_clip
from fff_vdi.data.sampler import ClipStream
from fff_vdi.data.shards import ShardSet, VideoEntry
from fff_vdi.errors import DataError


class ClipSource:
    """`conditioning`: a precomputed conditioning cache (fff_vdi.conditioning.reader.ConditioningCache)
    whose records of each clip the reader processes read with its frames; None: frames only."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, conditioning=None):
        self.shards = shards
        self.cfg = cfg
        self.conditioning = conditioning
        self.videos: list[VideoEntry] = [v for v in shards.videos if is_eligible(v.num_frames, cfg)]
        if not self.videos:
            longest = max((v.num_frames for v in shards.videos), default=0)
            raise DataError(
                f"{shards.root} (split '{shards.split}'): none of its {len(shards.videos)} videos can give a clip of "
                f"{cfg.num_frames} frames under short_video_policy='{cfg.short_video_policy}' and frame_steps="
                f"{list(cfg.frame_steps)} (longest video: {longest} frames). Lower data.num_frames, use "
                "data.short_video_policy=reflect_pad, or shard longer videos.")
        self.stream = ClipStream(len(self.videos), cfg.seed)

    def __len__(self) -> int:
        return len(self.videos)

    def plan(self, position: int) -> ClipPlan:
        index = self.stream.video_at(position)
        video = self.videos[index]
        mask_frames = None if video.masks is None else [m is not None for m in video.masks]
        return plan_clip(self.stream.visit_rng(position), position, index, video.num_frames,
                         (video.height, video.width), mask_frames, self.cfg)

    def video(self, plan: ClipPlan) -> VideoEntry:
        return self.videos[plan.video]

    def frame_bytes(self, plan: ClipPlan) -> list[bytes]:
        video = self.videos[plan.video]
        return [self.shards.read_frame(video, i) for i in plan.frame_indices]

    def cached_records(self, plan: ClipPlan) -> list[np.ndarray]:
        """The clip's records from the conditioning cache, as uint8 arrays (one per kind)."""
        video = self.videos[plan.video]
        return self.conditioning.clip_records(video.shard, video.key, plan.frame_indices)

    def object_labels(self, plan: ClipPlan) -> Optional[np.ndarray]:
        """(T, H, W) uint8 object ids at the output size, cropped and flipped like the frames; None
        unless the plan draws object masks."""
        if plan.mask.kind != "objects":
            return None
        video = self.videos[plan.video]
        out = np.empty((len(plan.frame_indices), self.cfg.height, self.cfg.width), dtype=np.uint8)
        rows, cols = _nearest_sample_grid(plan, video.height, video.width, self.cfg.height, self.cfg.width)
        for t, i in enumerate(plan.frame_indices):
            data = self.shards.read_mask(video, i)
            if data is None:
                raise DataError(f"{self.shards.root / video.shard}: member {video.key}.m{i:05d}.png is listed as "
                                "missing in the index but the plan needs it; re-run tools/shard_ytvos.py --verify")
            out[t] = decode_labels(data, f"{video.shard}:{video.key}.m{i:05d}.png")[rows][:, cols]
        return out


def decode_labels(data: bytes, name: str) -> np.ndarray:
    """Object ids of an annotation PNG: palette indices (YouTube-VOS, DAVIS) or grey levels."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"annotation {name} cannot be decoded ({e}); re-run tools/shard_ytvos.py --verify") from e
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8)
    grey = np.asarray(img.convert("L"), dtype=np.uint8)
    return (grey > 0).astype(np.uint8)


def _nearest_sample_grid(plan: ClipPlan, fh: int, fw: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns sampled by a nearest-neighbour crop-resize (then flipped)."""
    (y0, x0), (y1, x1) = plan.crop_start, plan.crop_end
    rows = np.floor((y0 + (np.arange(H) + 0.5) / H * (y1 - y0)) * fh).astype(np.int64).clip(0, fh - 1)
    cols = np.floor((x0 + (np.arange(W) + 0.5) / W * (x1 - x0)) * fw).astype(np.int64).clip(0, fw - 1)
    if plan.flip:
        cols = cols[::-1]
    return rows, cols
