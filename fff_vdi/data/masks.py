"""Inpainting masks for training clips: planned on the CPU from the visit's RNG, drawn on the device.

Three kinds, mixed by the weights in `MaskConfig`:
  rectangles  the paper's moving rectangles (docs/FFF-VDI.md, 'Training masks');
  freeform    E2FGVI/ProPainter-style blobs and brush strokes, still or moving;
  objects     YouTube-VOS object annotations of the clip's frames (cropped and flipped with the frames).
Planning draws a few dozen numbers per clip (cheap, exact, backend-independent); rasterising is
vectorised torch over (T, H, W) and runs where the frames are (GPU in training). 1 = hole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fff_vdi.config import FreeformMaskConfig, MaskConfig, RectangleMaskConfig
from fff_vdi.utils.devices import to_device

KINDS = ("rectangles", "freeform", "objects")


@dataclass(frozen=True)
class MaskPlan:
    kind: str
    dilation: int
    boxes: Optional[np.ndarray] = None  # (T, 4) int: y0, x0, h, w
    blob_centers: Optional[np.ndarray] = None  # (T, NB, 2) float: y, x
    blob_radius: Optional[np.ndarray] = None  # (NB,) px
    blob_amp: Optional[np.ndarray] = None  # (NB, K) relative radius wobble of harmonic k+1
    blob_phase: Optional[np.ndarray] = None  # (NB, K)
    stroke_points: Optional[np.ndarray] = None  # (T, NS, V, 2) float: y, x
    stroke_width: Optional[np.ndarray] = None  # (NS,) px
    object_pick: Optional[tuple[float, float]] = None  # (all-objects draw, which-object draw)
    fallback: Optional["MaskPlan"] = None  # used when an 'objects' clip has no object in its frames


# ---------------------------------------------------------------------------------------------
# planning (numpy, from the visit's generator)


def plan_rectangles(rng: np.random.Generator, T: int, H: int, W: int, c: RectangleMaskConfig, dilation: int) -> MaskPlan:
    """The published moving rectangle. Deviation, on purpose: the published code swaps height and
    width when keeping the box inside the frame; we keep the box inside with the right sides."""
    min_h, max_h = int(H * c.min_size), int(H * c.max_size)
    min_w, max_w = int(W * c.min_size), int(W * c.max_size)
    base_h = int(rng.integers(min_h, max_h + 1))
    base_w = int(rng.integers(min_w, max_w + 1))
    osc_h = float(rng.uniform(-c.size_oscillation, c.size_oscillation))
    osc_w = float(rng.uniform(-c.size_oscillation, c.size_oscillation))
    y = int(rng.integers(0, H - max_h + 1))
    x = int(rng.integers(0, W - max_w + 1))
    speed = float(rng.uniform(c.min_speed, c.max_speed))
    angle = float(rng.uniform(0, 2 * math.pi))
    boxes = np.zeros((T, 4), dtype=np.int64)
    for t in range(T):
        wave = (1 + math.sin(2 * math.pi * t / T)) / 2
        h = min(H, int(base_h + base_h * osc_h * wave))
        w = min(W, int(base_w + base_w * osc_w * wave))
        y += int(speed * math.cos(angle))
        x += int(speed * math.sin(angle))
        speed += float(rng.normal(0, c.speed_sd))
        angle += float(rng.normal(0, c.angle_sd))
        if y > H - h or y < 0 or x > W - w or x < 0:  # bounced off an edge: a fresh velocity
            speed = abs(float(rng.normal(0, c.speed_sd)))
            angle = float(rng.uniform(0, 2 * math.pi))
        y = int(np.clip(y, 0, H - h))
        x = int(np.clip(x, 0, W - w))
        boxes[t] = (y, x, h, w)
    return MaskPlan("rectangles", dilation, boxes=boxes)


def _trajectories(rng: np.random.Generator, n: int, T: int, H: int, W: int, moving: bool, max_speed: float) -> np.ndarray:
    """(T, n, 2) offsets of n shapes: zero when still, else a random walk with random acceleration."""
    offsets = np.zeros((T, n, 2))
    if not moving:
        return offsets
    speed = rng.uniform(0, max_speed, size=n)
    angle = rng.uniform(0, 2 * math.pi, size=n)
    pos = np.zeros((n, 2))
    for t in range(1, T):
        pos = pos + np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=1)
        speed = np.clip(speed + rng.normal(0, max_speed / 4, size=n), 0, max_speed)
        angle = angle + rng.normal(0, 0.25, size=n)
        offsets[t] = pos
    return offsets


def plan_freeform(rng: np.random.Generator, T: int, H: int, W: int, c: FreeformMaskConfig, dilation: int) -> MaskPlan:
    S = min(H, W)
    n_blobs = int(rng.integers(c.min_blobs, c.max_blobs + 1))
    n_strokes = int(rng.integers(c.min_strokes, c.max_strokes + 1))
    if n_blobs + n_strokes == 0:
        n_blobs = 1
    moving = bool(rng.random() < c.moving_prob)
    K = 4  # harmonics of the blob outline: smooth, star-convex shapes
    centers0 = np.stack([rng.uniform(0, H, size=n_blobs), rng.uniform(0, W, size=n_blobs)], axis=1)
    radius = rng.uniform(c.blob_min_size, c.blob_max_size, size=n_blobs) * S
    amp = rng.uniform(0, 0.35, size=(n_blobs, K)) / np.arange(1, K + 1)
    phase = rng.uniform(0, 2 * math.pi, size=(n_blobs, K))
    blob_centers = centers0[None] + _trajectories(rng, n_blobs, T, H, W, moving, c.max_speed)
    V = max(2, c.stroke_vertices)
    start = np.stack([rng.uniform(0, H, size=n_strokes), rng.uniform(0, W, size=n_strokes)], axis=1)
    seg_len = rng.uniform(0.08, 0.25, size=(n_strokes, V - 1)) * S
    seg_dir = rng.uniform(0, 2 * math.pi, size=(n_strokes, 1)) + np.cumsum(rng.normal(0, 0.8, size=(n_strokes, V - 1)), axis=1)
    steps = np.stack([seg_len * np.cos(seg_dir), seg_len * np.sin(seg_dir)], axis=2)
    points0 = np.concatenate([start[:, None], start[:, None] + np.cumsum(steps, axis=1)], axis=1)  # (NS, V, 2)
    widths = rng.uniform(c.stroke_min_width, c.stroke_max_width, size=n_strokes) * S
    stroke_points = points0[None] + _trajectories(rng, n_strokes, T, H, W, moving, c.max_speed)[:, :, None, :]
    return MaskPlan("freeform", dilation, blob_centers=blob_centers, blob_radius=radius, blob_amp=amp,
                    blob_phase=phase, stroke_points=stroke_points, stroke_width=widths)


def plan_mask(rng: np.random.Generator, T: int, H: int, W: int, cfg: MaskConfig, has_object_masks: bool) -> MaskPlan:
    """Choose the kind by the mixture weights, then plan it. Always draws the same numbers in the same
    order for a given kind, and an 'objects' plan carries a rectangle fallback."""
    weights = np.array([cfg.rectangles, cfg.freeform, cfg.objects], dtype=np.float64)
    kind = KINDS[int(rng.choice(3, p=weights / weights.sum()))]
    if kind == "rectangles":
        return plan_rectangles(rng, T, H, W, cfg.rect, cfg.dilation)
    if kind == "freeform":
        return plan_freeform(rng, T, H, W, cfg.free, cfg.dilation)
    pick = (float(rng.random()), float(rng.random()))
    fallback = plan_rectangles(rng, T, H, W, cfg.rect, cfg.dilation)
    if not has_object_masks:
        return fallback
    return MaskPlan("objects", cfg.dilation, object_pick=pick, fallback=fallback)


# ---------------------------------------------------------------------------------------------
# drawing (torch, on any device)


def _grid(H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    yy = torch.arange(H, device=device, dtype=torch.float32).view(H, 1) + 0.5
    xx = torch.arange(W, device=device, dtype=torch.float32).view(1, W) + 0.5
    return yy, xx


def draw_rectangles(boxes: np.ndarray, H: int, W: int, device) -> torch.Tensor:
    b = to_device(boxes, device)
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    y0, x0, h, w = (b[:, i].view(-1, 1, 1) for i in range(4))
    return ((rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w))


def draw_freeform(plan: MaskPlan, H: int, W: int, device) -> torch.Tensor:
    T = plan.blob_centers.shape[0]
    yy, xx = _grid(H, W, device)
    out = torch.zeros(T, H, W, dtype=torch.bool, device=device)
    f32 = dict(device=device, dtype=torch.float32)
    if plan.blob_radius.size:
        centers = to_device(plan.blob_centers, device, torch.float32)  # (T, NB, 2)
        dy = yy[None, None] - centers[..., 0, None, None]
        dx = xx[None, None] - centers[..., 1, None, None]
        theta = torch.atan2(dy, dx)  # (T, NB, H, W)
        k = torch.arange(1, plan.blob_amp.shape[1] + 1, **f32)
        amp = to_device(plan.blob_amp, device, torch.float32)
        phase = to_device(plan.blob_phase, device, torch.float32)
        wobble = (amp[None, :, :, None, None] * torch.cos(k.view(1, 1, -1, 1, 1) * theta[:, :, None] + phase[None, :, :, None, None])).sum(2)
        radius = to_device(plan.blob_radius, device, torch.float32).view(1, -1, 1, 1) * (1 + wobble)
        out |= (dy * dy + dx * dx <= radius * radius).any(1)
    if plan.stroke_width.size:
        pts = to_device(plan.stroke_points, device, torch.float32)  # (T, NS, V, 2)
        half_w = to_device(plan.stroke_width, device, torch.float32).view(1, -1, 1, 1) / 2
        for v in range(pts.shape[2] - 1):
            a, b = pts[:, :, v], pts[:, :, v + 1]  # (T, NS, 2)
            ab = b - a
            ay, ax = a[..., 0, None, None], a[..., 1, None, None]
            aby, abx = ab[..., 0, None, None], ab[..., 1, None, None]
            denom = (aby * aby + abx * abx).clamp_min(1e-6)
            s = (((yy - ay) * aby + (xx - ax) * abx) / denom).clamp(0, 1)
            dist2 = (yy - ay - s * aby) ** 2 + (xx - ax - s * abx) ** 2
            out |= (dist2 <= half_w * half_w).any(1)
    return out


def select_objects(labels: torch.Tensor, pick: tuple[float, float]) -> Optional[torch.Tensor]:
    """From per-pixel object ids (T, H, W) choose all objects (first draw < 0.5) or one of them.
    Returns None when the window shows no object (the plan's fallback is drawn instead)."""
    ids = torch.unique(labels)
    ids = ids[ids != 0]
    if ids.numel() == 0:
        return None
    if pick[0] < 0.5:
        return labels != 0
    chosen = ids[min(int(pick[1] * ids.numel()), ids.numel() - 1)]
    return labels == chosen


def dilate(mask_t1hw: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask_t1hw
    return F.max_pool2d(mask_t1hw, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def draw_mask(plan: MaskPlan, H: int, W: int, device, object_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rasterise a plan to a float (T, 1, H, W) mask in {0, 1} (1 = hole) on `device`.

    `object_labels` (T, H, W) integer object ids at the output resolution, already cropped and flipped
    like the frames, are needed for 'objects' plans."""
    if plan.kind == "rectangles":
        m = draw_rectangles(plan.boxes, H, W, device)
    elif plan.kind == "freeform":
        m = draw_freeform(plan, H, W, device)
    elif plan.kind == "objects":
        if object_labels is None:
            raise ValueError("an 'objects' mask plan needs the clip's object labels")
        # Chosen where the labels are (on the host with the CPU backend): the choice reads the ids,
        # which on the GPU would wait for its queued work.
        m = select_objects(object_labels, plan.object_pick)
        if m is None:
            return draw_mask(plan.fallback, H, W, device)
        m = to_device(m, device)
    else:
        raise ValueError(f"unknown mask kind {plan.kind!r}")
    return dilate(m.to(torch.float32).unsqueeze(1), plan.dilation)
