"""Everything random about one visit of a video, drawn from (seed, stream position) alone.

A `ClipPlan` says which frames to read, how to crop, flip and colour them, and which mask to draw.
Both loaders (DALI on the GPU, PIL on the CPU) execute the same plan, so the same (seed, position)
gives the same window, crop and mask on any backend and any number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from fff_vdi.config import DataConfig
from fff_vdi.data.masks import MaskPlan, plan_mask


@dataclass(frozen=True)
class ClipPlan:
    position: int  # stream position of this visit
    video: int  # index into the eligible-video list
    frame_indices: tuple[int, ...]  # T indices into the video's frames
    step: int
    # Crop box in relative coordinates of the source frame: [y0, x0] to [y1, x1] in [0, 1].
    crop_start: tuple[float, float]
    crop_end: tuple[float, float]
    flip: bool
    jitter: Optional[tuple[float, float, float, float]]  # brightness, contrast, saturation, hue
    mask: MaskPlan


def usable_steps(num_frames: int, window: int, steps: Sequence[int]) -> list[int]:
    """Configured frame steps whose window of `window` frames fits in `num_frames`."""
    return [s for s in steps if (window - 1) * s + 1 <= num_frames]


def is_eligible(num_frames: int, cfg: DataConfig) -> bool:
    """Whether a video takes part under the short-video policy.

    skip:         every configured step must fit (the published loader went further and dropped
                  videos of T frames or fewer).
    smaller_step: some step down to 1 must fit, i.e. at least T frames.
    reflect_pad:  any video with at least 2 frames (the window reflects at the ends).
    """
    T = cfg.num_frames
    policy = cfg.short_video_policy
    if policy == "skip":
        return (T - 1) * max(cfg.frame_steps) + 1 <= num_frames
    if policy == "smaller_step":
        return num_frames >= T
    return num_frames >= 2


def _reflect(i: int, n: int) -> int:
    """Index i folded back and forth over 0..n-1 (0,1,..,n-1,n-2,..,0,1,..)."""
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


def effective_step(num_frames: int, window: int, step: int) -> int | None:
    """The frame step a window of `window` frames takes in a video of `num_frames` frames when `step`
    is drawn: `step` if the window fits, else the largest smaller step that fits; None when no step
    fits (the window then reflects at the video's ends with step 1)."""
    fitting = usable_steps(num_frames, window, range(step, 0, -1))
    return fitting[0] if fitting else None


def steps_in_use(num_frames: int, cfg: DataConfig) -> set[int]:
    """Every frame step the clips of an eligible video of `num_frames` frames can take (empty for a
    video that takes no part): what a conditioning cache must hold flows for."""
    if not is_eligible(num_frames, cfg):
        return set()
    return {effective_step(num_frames, cfg.num_frames, int(s)) or 1 for s in cfg.frame_steps}


def draw_window(rng: np.random.Generator, num_frames: int, cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    T = cfg.num_frames
    step = effective_step(num_frames, T, int(rng.choice(np.asarray(cfg.frame_steps))))
    if step is None:  # reflect_pad on a video shorter than the window
        start = int(rng.integers(0, num_frames))
        return tuple(_reflect(start + k, num_frames) for k in range(T)), 1
    span = (T - 1) * step + 1
    start = int(rng.integers(0, num_frames - span + 1))
    return tuple(start + k * step for k in range(T)), step


def draw_crop(rng: np.random.Generator, frame_hw: tuple[int, int], cfg: DataConfig):
    """Aspect-preserving random resized crop: a box of the output's aspect ratio covering a random
    share (crop_scale, as area) of the largest such box, placed uniformly."""
    fh, fw = frame_hw
    aspect = cfg.width / cfg.height
    max_w = min(fw, fh * aspect)
    max_h = max_w / aspect
    lo, hi = cfg.crop_scale
    side = math.sqrt(float(rng.uniform(lo, hi)))
    cw, ch = max_w * side, max_h * side
    x0 = float(rng.uniform(0, fw - cw)) if fw > cw else 0.0
    y0 = float(rng.uniform(0, fh - ch)) if fh > ch else 0.0
    return (y0 / fh, x0 / fw), ((y0 + ch) / fh, (x0 + cw) / fw)


def draw_jitter(rng: np.random.Generator, cfg: DataConfig):
    j = cfg.color_jitter
    return (
        float(rng.uniform(1 - j.brightness, 1 + j.brightness)),
        float(rng.uniform(1 - j.contrast, 1 + j.contrast)),
        float(rng.uniform(1 - j.saturation, 1 + j.saturation)),
        float(rng.uniform(-j.hue, j.hue)),
    )


def plan_clip(rng: np.random.Generator, position: int, video: int, num_frames: int, frame_hw: tuple[int, int],
              mask_frames: Optional[Sequence[bool]], cfg: DataConfig) -> ClipPlan:
    """Draw every random choice of one visit, always in the same order (so plans never shift).

    `mask_frames[i]` says whether frame i of the video has an object annotation (None: no annotations);
    object masks are used only for windows where every frame has one."""
    frame_indices, step = draw_window(rng, num_frames, cfg)
    crop_start, crop_end = draw_crop(rng, frame_hw, cfg)  # drawn either way: later draws never shift
    if cfg.crop == "none":
        crop_start, crop_end = (0.0, 0.0), (1.0, 1.0)
    flip = bool(rng.random() < cfg.hflip_prob)
    jitter = draw_jitter(rng, cfg)
    has_object_masks = mask_frames is not None and all(mask_frames[i] for i in frame_indices)
    mask = plan_mask(rng, cfg.num_frames, cfg.height, cfg.width, cfg.masks, has_object_masks)
    return ClipPlan(position, video, frame_indices, step, crop_start, crop_end, flip,
                    jitter if cfg.color_jitter.enabled else None, mask)
