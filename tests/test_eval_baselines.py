"""The classical fill that learned inpainting is measured against (fff_vdi/eval/baselines.py)."""

from __future__ import annotations

import torch

from fff_vdi.eval.baselines import harmonic_fill, temporal_median_fill


def test_harmonic_fill_is_exact_on_harmonic_functions_and_keeps_known_pixels():
    y, x = torch.meshgrid(torch.arange(37.0), torch.arange(53.0), indexing="ij")
    images = torch.stack([0.02 * x - 0.01 * y, 0.03 * y, x * 0 + 0.5])[None]  # planes: Laplace's solutions
    unknown = torch.zeros(1, 1, 37, 53, dtype=torch.bool)
    unknown[..., 5:30, 8:45] = True  # a large hole, far from the boundary
    filled = harmonic_fill(images.masked_fill(unknown, float("nan")), unknown)
    assert torch.allclose(filled, images, atol=1e-5)
    assert torch.equal(filled[~unknown.expand_as(filled)], images[~unknown.expand_as(images)])
    nothing_known = harmonic_fill(images, torch.ones_like(unknown))
    assert torch.equal(nothing_known, torch.zeros_like(images))


def test_temporal_median_recovers_a_static_scene_under_a_moving_hole():
    torch.manual_seed(0)
    scene = torch.rand(3, 24, 40) * 2 - 1
    frames = scene.expand(5, 3, 24, 40).clone()
    masks = torch.zeros(5, 1, 24, 40)
    for t in range(5):
        masks[t, :, 4:20, 4 + 6 * t : 14 + 6 * t] = 1  # slides right: every pixel is seen somewhere
    filled = temporal_median_fill(frames.masked_fill(masks > 0, 0.0), masks)
    assert torch.allclose(filled, frames)
    masks[:, :, 10:14, 20:24] = 1  # hidden in every frame: interpolated, finite, in range
    filled = temporal_median_fill(frames.masked_fill(masks > 0, 0.0), masks)
    hidden = filled[:, :, 10:14, 20:24]
    assert torch.isfinite(hidden).all() and hidden.abs().max() <= 1
    assert torch.allclose(filled[:, :, :, :18], frames[:, :, :, :18])
