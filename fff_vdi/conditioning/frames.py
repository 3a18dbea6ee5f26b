"""Every frame of a list of videos, decoded by the training loader's own backends.

The cache must hold what the online path computes from the frames the training loader decodes
(DALI's nvJPEG and resize on the GPU, PIL on the CPU: their pixels differ slightly), so the tool
decodes through the same code: `FrameChunks` stands in for `ClipSource`, and its "clips" are chunks
of consecutive frames of one video, planned like a training clip with `data.crop=none` (the whole
frame resized to H x W), no flip and no jitter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from fff_vdi.config import ColorJitterConfig, DataConfig, MaskConfig
from fff_vdi.data.loader import pixel_values
from fff_vdi.data.plan import ClipPlan
from fff_vdi.data.sampler import RankSlice
from fff_vdi.data.shards import ShardSet, VideoEntry

FRAMES_PER_CHUNK = 16


class FrameChunks:
    """What the loaders read, `ClipSource`'s interface: stream position k is the k-th chunk of
    FRAMES_PER_CHUNK frames of `videos` (a video's last chunk repeats its last frame to fill up;
    positions past the end repeat the last chunk, for the loaders' read-ahead)."""

    def __init__(self, shards: ShardSet, videos: list[VideoEntry], data: DataConfig):
        self.shards = shards
        self.videos = videos
        self.conditioning = None
        self.cfg = replace(data, num_frames=FRAMES_PER_CHUNK, batch_size=1, crop="none", hflip_prob=0.0,
                           color_jitter=ColorJitterConfig(enabled=False), masks=MaskConfig(), conditioning=None)
        self.chunks: list[tuple[int, tuple[int, ...]]] = []
        for v, video in enumerate(videos):
            for start in range(0, video.num_frames, FRAMES_PER_CHUNK):
                frames = range(start, min(start + FRAMES_PER_CHUNK, video.num_frames))
                self.chunks.append((v, tuple(frames) + (frames[-1],) * (FRAMES_PER_CHUNK - len(frames))))

    def plan(self, position: int) -> ClipPlan:
        v, frames = self.chunks[min(position, len(self.chunks) - 1)]
        return ClipPlan(position, v, frames, 1, (0.0, 0.0), (1.0, 1.0), False, None, None)

    def video(self, plan: ClipPlan) -> VideoEntry:
        return self.videos[plan.video]

    def frame_bytes(self, plan: ClipPlan) -> list[bytes]:
        video = self.videos[plan.video]
        return [self.shards.read_frame(video, i) for i in plan.frame_indices]

    def object_labels(self, plan: ClipPlan) -> None:
        return None


def decoded_videos(shards: ShardSet, videos: list[VideoEntry], data: DataConfig, backend: str,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """(num_frames, 3, H, W) float32 in [-1, 1] on `device` for each of `videos`, in order."""
    if not videos:
        return
    source = FrameChunks(shards, videos, data)
    rank_slice = RankSlice(0, 0, 1, 1)
    if backend == "dali":
        from fff_vdi.data.dali_loader import dali_batches

        batches = dali_batches(source, rank_slice, device)
    else:
        from fff_vdi.data.cpu_loader import cpu_batches

        batches = cpu_batches(source, rank_slice, source.cfg.num_workers, source.cfg.prefetch)
    position = 0
    try:
        for video in videos:
            parts = []
            for start in range(0, video.num_frames, FRAMES_PER_CHUNK):
                raw = next(batches)
                if raw["positions"] != [position]:
                    raise RuntimeError(f"frame decoding out of order: got chunk {raw['positions']}, expected {position}")
                parts.append(pixel_values(raw, device)[0, :video.num_frames - start])
                position += 1
            yield torch.cat(parts)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
