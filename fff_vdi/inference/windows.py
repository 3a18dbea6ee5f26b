"""Videos of any length: overlapping windows of T frames, each continuing the one before.

The published sampler inpaints one clip of the model's length. A longer video is cut into windows
of `window` frames that overlap by (at least) `overlap` frames; the last window is aligned to the
video's end, so it may overlap its predecessor by more:

    80 frames, window 25, overlap 6  ->  [0, 25) [19, 44) [38, 63) [55, 80)

Continuation: a window's leading frames that earlier windows already inpainted are given to the
sampler as known pixels (the current result composited into the input) with their holes cleared.
The first frame's CLIP embedding, the flows and the noise refiner then carry the existing content
into the new frames instead of inventing new content.

Blending (`blend`) of the m overlap frames:

- "crossfade" (default): all m are known to the new window; its output there is cross-faded with
  the current result by linear weights, (j + 1) / (m + 1) for the new window at overlap frame j.
  Its output on known frames is close to them, so the new content starts at the first frame after
  the overlap.
- "keep": all m are known; the current result is kept there (no cross-fade): the baseline that
  shows what the cross-fade does.
- "handover": the first ceil(m / 2) are known; in the others the new window inpaints the hole
  itself, and its frames are cross-faded with the previous window's, (i + 1) / (n + 1) at frame i
  of those n: both windows generated them, so the change from one window's content to the next is
  spread over n frames instead of falling between two.

bench/seams.py measures them (E_warp across window borders against inside windows).

Everything here works at the model's size on the CPU; only one window at a time goes to the
sampler's device. Frames are finished (and yielded) as soon as no later window covers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from fff_vdi.errors import InputError
from fff_vdi.inference.sampler import InpaintSampler


@dataclass(frozen=True)
class Window:
    start: int
    stop: int
    num_known: int  # leading frames already inpainted by earlier windows: conditioned on and cross-faded

    def __len__(self) -> int:
        return self.stop - self.start


def plan_windows(num_frames: int, window: int, overlap: int) -> list[Window]:
    """Windows covering [0, num_frames): stride window - overlap, the last one aligned to the end."""
    if window < 2:
        raise InputError(f"--window {window}: a window needs at least 2 frames")
    if not 0 <= overlap < window:
        raise InputError(f"--overlap {overlap}: use 0 <= overlap < window ({window})")
    if num_frames < 2:
        raise InputError(f"the video has {num_frames} frame(s): FFF-VDI needs at least 2 (flows link neighbouring frames)")
    if num_frames <= window:
        return [Window(0, num_frames, 0)]
    starts = list(range(0, num_frames - window, window - overlap)) + [num_frames - window]
    windows, covered = [], 0
    for start in starts:
        windows.append(Window(start, start + window, max(0, covered - start)))
        covered = start + window
    return windows


def default_overlap(window: int) -> int:
    """A quarter of the window (6 of 25 frames): enough context to continue, little recomputation."""
    return window // 4


def crossfade_weights(num_known: int) -> np.ndarray:
    """Weight of the new window at each of the `num_known` overlap frames: (j + 1) / (num_known + 1)."""
    return (np.arange(num_known, dtype=np.float32) + 1) / (num_known + 1)


BLENDS = ("crossfade", "keep", "handover")


def overlap_plan(num_overlap: int, blend: str) -> tuple[int, np.ndarray]:
    """(overlap frames given to the new window as known, weight of the new window's output at each
    overlap frame) for `blend` (see the module docstring)."""
    if blend == "crossfade":
        return num_overlap, crossfade_weights(num_overlap)
    if blend == "keep":
        return num_overlap, np.zeros(num_overlap, np.float32)
    if blend == "handover":
        known = (num_overlap + 1) // 2
        return known, np.concatenate([np.zeros(known, np.float32), crossfade_weights(num_overlap - known)])
    raise InputError(f"--blend {blend}: use one of {', '.join(BLENDS)}")


WindowCallback = Callable[[int, int, int, int], None]  # (window index, windows, UNet calls done, UNet calls per window)


class WindowedInpainter:
    """Inpaint a whole video at the model's size with an `InpaintSampler`, window after window."""

    def __init__(self, sampler: InpaintSampler, window: int, overlap: int, blend: str = "crossfade"):
        overlap_plan(0, blend)  # checks the name
        self.sampler = sampler
        self.window = window
        self.overlap = overlap
        self.blend = blend

    def __call__(
        self,
        frames_thwc: np.ndarray,
        holes_thw: np.ndarray,
        generator: torch.Generator,
        on_step: WindowCallback | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, inpainted frame (3, h, w) float32 in [-1, 1]) in frame order.

        frames_thwc: uint8 RGB at the model's size; holes_thw: bool, True = hole. The yielded
        frames are the model's output everywhere (composite them into the input yourself).
        Windows whose frames have no hole at all are not sampled: their output is the input.
        """
        windows = plan_windows(len(frames_thwc), self.window, self.overlap)
        pending: dict[int, np.ndarray] = {}  # inpainted, not yet final (a later window overlaps them)
        next_to_yield = 0
        for index, window in enumerate(windows):
            frames = frames_thwc[window.start : window.stop].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
            holes = holes_thw[window.start : window.stop].copy()
            num_known, weights = overlap_plan(window.num_known, self.blend)
            for j in range(num_known):
                frames[j] = np.where(holes[j], pending[window.start + j], frames[j])
            holes[:num_known] = False

            if holes.any():
                callback = None if on_step is None else (lambda done, total, i=index: on_step(i, len(windows), done, total))
                output = self.sampler(
                    torch.from_numpy(frames)[None],
                    torch.from_numpy(holes)[None, :, None].float(),
                    generator,
                    callback=callback,
                )[0].numpy()
            else:
                output = frames
                if on_step is not None:
                    on_step(index, len(windows), self.sampler.num_unet_calls, self.sampler.num_unet_calls)

            for j in range(len(window)):
                frame = window.start + j
                if j < window.num_known:
                    pending[frame] = (1 - weights[j]) * pending[frame] + weights[j] * output[j]
                else:
                    pending[frame] = output[j]

            final_stop = windows[index + 1].start if index + 1 < len(windows) else len(frames_thwc)
            while next_to_yield < final_stop:
                yield next_to_yield, pending.pop(next_to_yield)
                next_to_yield += 1
