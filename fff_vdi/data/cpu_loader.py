"""CPU backend: PIL decodes and crop-resizes in DataLoader workers (CI, laptops, the baseline).

Same contract as the DALI backend: it executes the same `ClipPlan`s, so windows, crops, flips and
masks are identical; pixels differ only by decoder and resize numerics (libjpeg-turbo vs nvJPEG,
PIL's antialiased bilinear vs DALI's), bounded in tests/test_data_loader.py.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from fff_vdi.data.clips import ClipSource
from fff_vdi.data.sampler import RankSlice
from fff_vdi.errors import DataError


def decode_crop_resize(data: bytes, plan, height: int, width: int, name: str) -> np.ndarray:
    """One frame: decode, crop to the plan's box and resize to (height, width) with PIL's
    antialiased bilinear filter, flip; (H, W, 3) uint8."""
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:
        raise DataError(f"frame {name} cannot be decoded ({e}); run tools/shard_ytvos.py --verify on the shards") from e
    fh, fw = img.height, img.width
    (y0, x0), (y1, x1) = plan.crop_start, plan.crop_end
    img = img.resize((width, height), Image.BILINEAR, box=(x0 * fw, y0 * fh, x1 * fw, y1 * fh))
    if plan.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


class _ClipDataset(torch.utils.data.Dataset):
    """Map-style view: item = stream position -> decoded uint8 clip (T, H, W, 3) and object labels."""

    def __init__(self, source: ClipSource):
        self.source = source

    def __getitem__(self, position: int):
        source, cfg = self.source, self.source.cfg
        plan = source.plan(position)
        video = source.video(plan)
        frames = [
            decode_crop_resize(data, plan, cfg.height, cfg.width, f"{video.shard}:{video.key}.f{i:05d}.jpg")
            for data, i in zip(source.frame_bytes(plan), plan.frame_indices)
        ]
        labels = source.object_labels(plan)
        return {
            "position": position,
            "frames": torch.from_numpy(np.stack(frames)),
            "labels": None if labels is None else torch.from_numpy(labels),
            "cached": None if source.conditioning is None else [torch.from_numpy(r) for r in source.cached_records(plan)],
        }


class _RankPositions(torch.utils.data.Sampler):
    """This rank's stream positions from `rank_slice.start` on, without end."""

    def __init__(self, rank_slice: RankSlice):
        self.rank_slice = rank_slice

    def __iter__(self) -> Iterator[int]:
        k = 0
        while True:
            yield self.rank_slice.position_of_sample(k)
            k += 1


def _collate(items: list[dict]) -> dict:
    batch = {
        "positions": [it["position"] for it in items],
        "frames_uint8": torch.stack([it["frames"] for it in items]),
        "labels": [it["labels"] for it in items],
    }
    if items[0]["cached"] is not None:  # one (B, bytes) tensor per kind of record
        batch["cached"] = [torch.stack(kind) for kind in zip(*(it["cached"] for it in items))]
    return batch


def cpu_batches(source: ClipSource, rank_slice: RankSlice, num_workers: int, prefetch: int,
                pin_memory: bool = False) -> Iterator[dict]:
    """Batches of uint8 clips (B, T, H, W, 3) on the CPU, in stream order. `pin_memory` (for a CUDA
    device): in page-locked memory, so the copy to the GPU is asynchronous; from pageable memory it
    waits for the GPU's queued work, and the host then cannot run ahead of the step (with a
    conditioning cache: tens of MB of flows per batch)."""
    loader = torch.utils.data.DataLoader(
        _ClipDataset(source),
        batch_size=rank_slice.batch_size,
        sampler=_RankPositions(rank_slice),
        num_workers=num_workers,
        collate_fn=_collate,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    return iter(loader)
