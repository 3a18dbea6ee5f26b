"""Which clip every rank reads at every step: a deterministic, rank-count-independent stream.

The clip stream is the concatenation of epoch orders: epoch e visits every eligible video once, in
a permutation drawn from (seed, e). Position p of the stream is one *visit*; everything random about
that visit (window, frame step, crop, flip, jitter, mask) is drawn from (seed, p) alone (see
`plan.py`), so the same position gives the same clip whatever the number of ranks.

A global batch takes the next `world_size * batch_size` positions; rank r takes the r-th slice of
`batch_size`. Epochs flow into each other (the last global batch of an epoch takes its remaining clips
from the next epoch's order), so no visit is dropped or repeated and every rank yields a batch at every
step: no rank ever waits for another at an epoch end. The only state is the position of the next global
batch, which makes resume exact, also on another number of ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def stream_rng(seed: int, *words: int) -> np.random.Generator:
    """An independent generator for (seed, *words); stable across numpy versions and platforms."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, words)])))


# Domain separators, so that epoch orders and per-visit draws never share a stream.
_EPOCH_ORDER = 0x0E0C
_VISIT = 0x0515


class ClipStream:
    """Maps stream positions to (epoch, video index) for `num_videos` eligible videos."""

    def __init__(self, num_videos: int, seed: int):
        if num_videos <= 0:
            raise ValueError("the clip stream needs at least one eligible video")
        self.num_videos = int(num_videos)
        self.seed = int(seed)

    def epoch_of(self, position: int) -> int:
        return position // self.num_videos

    @functools.lru_cache(maxsize=4)
    def epoch_order(self, epoch: int) -> np.ndarray:
        return stream_rng(self.seed, _EPOCH_ORDER, epoch).permutation(self.num_videos)

    def video_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.num_videos)
        return int(self.epoch_order(epoch)[offset])

    def visit_rng(self, position: int) -> np.random.Generator:
        return stream_rng(self.seed, _VISIT, position)


@dataclass(frozen=True)
class RankSlice:
    """The positions one rank reads: global batch g covers [start + g*W*B, start + (g+1)*W*B)."""

    start: int  # stream position of the first global batch
    rank: int
    world_size: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def positions(self, batch_index: int) -> list[int]:
        """Stream positions of this rank's `batch_index`-th batch (counted from `start`)."""
        first = self.start + batch_index * self.global_batch + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def position_of_sample(self, local_sample: int) -> int:
        """Stream position of this rank's `local_sample`-th sample (batches laid end to end)."""
        batch_index, j = divmod(local_sample, self.batch_size)
        return self.positions(batch_index)[j]

    def next_start(self, batches_consumed: int) -> int:
        return self.start + batches_consumed * self.global_batch
