"""Statistics of every mask kind, reproducibility from the seed, and drawing on any device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fff_vdi.config import MaskConfig
from fff_vdi.data.masks import dilate, draw_mask, plan_freeform, plan_mask, plan_rectangles, select_objects

T, H, W = 25, 128, 256


def rect_plans(n=200, seed=0):
    cfg = MaskConfig()
    return [plan_rectangles(np.random.default_rng([seed, i]), T, H, W, cfg.rect, 0) for i in range(n)]


def test_rectangles_follow_the_published_statistics():
    sizes_h, sizes_w, moves = [], [], []
    for plan in rect_plans():
        b = plan.boxes
        y0, x0, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
        sizes_h += list(h / H)
        sizes_w += list(w / W)
        moves += list(np.hypot(np.diff(y0), np.diff(x0)))
        # The size oscillates by at most 10% of its base, up or down.
        assert h.max() <= h.min() / 0.9 + 1 and w.max() <= w.min() / 0.9 + 1
    for sizes in (sizes_h, sizes_w):
        assert 0.2 * 0.9 - 0.01 <= min(sizes) and max(sizes) <= 0.8 * 1.1 + 0.01
        assert 0.45 < np.mean(sizes) < 0.55  # uniform base size in [0.2, 0.8]
    moves = np.asarray(moves)
    assert 0.5 < np.median(moves) < 4  # a few pixels per frame
    assert (moves > 0).mean() > 0.6  # they move


def test_rectangle_drawing_matches_the_boxes():
    plan = rect_plans(1)[0]
    m = draw_mask(plan, H, W, "cpu")
    assert m.shape == (T, 1, H, W) and m.dtype == torch.float32
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    for t, (y0, x0, h, w) in enumerate(plan.boxes):
        assert m[t, 0].sum().item() == h * w
        assert m[t, 0, y0:y0 + h, x0:x0 + w].all()


def test_freeform_masks_cover_plausible_areas_and_move_when_planned():
    cfg = MaskConfig(rectangles=0, freeform=1)
    ratios, moving_seen, still_seen = [], False, False
    for i in range(40):
        plan = plan_freeform(np.random.default_rng([1, i]), 8, 96, 160, cfg.free, 0)
        m = draw_mask(plan, 96, 160, "cpu")[:, 0]
        ratios.append(m.mean().item())
        change = (m[1:] != m[:-1]).float().mean().item()
        moving_seen |= change > 0
        still_seen |= change == 0
    assert 0.03 < np.median(ratios) < 0.6
    assert min(ratios) > 0
    assert moving_seen and still_seen


def test_mixture_weights_choose_kinds():
    cfg = MaskConfig(rectangles=1, freeform=1, objects=2)
    kinds = [plan_mask(np.random.default_rng([2, i]), 4, 64, 64, cfg, True).kind for i in range(800)]
    share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
    assert share["rectangles"] == pytest.approx(0.25, abs=0.05)
    assert share["freeform"] == pytest.approx(0.25, abs=0.05)
    assert share["objects"] == pytest.approx(0.5, abs=0.05)
    # Without annotations for the window, object plans fall back to rectangles.
    kinds = {plan_mask(np.random.default_rng([2, i]), 4, 64, 64, cfg, False).kind for i in range(200)}
    assert kinds == {"rectangles", "freeform"}


def test_object_masks_select_one_or_all_objects():
    labels = torch.zeros(3, 8, 8, dtype=torch.uint8)
    labels[:, :4, :4] = 1
    labels[:, 4:, 4:] = 2
    assert select_objects(labels, (0.1, 0.0)).sum().item() == 2 * 3 * 16  # all objects
    one = select_objects(labels, (0.9, 0.99))
    assert one.sum().item() == 3 * 16 and one[:, 5, 5].all()  # the second object
    assert select_objects(torch.zeros(3, 8, 8, dtype=torch.uint8), (0.1, 0.1)) is None
    cfg = MaskConfig(rectangles=0, objects=1)
    plan = plan_mask(np.random.default_rng(0), 3, 8, 8, cfg, True)
    empty = draw_mask(plan, 8, 8, "cpu", torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert empty.sum() > 0  # the rectangle fallback


def test_dilation_grows_each_hole_by_the_radius():
    m = torch.zeros(1, 1, 20, 20)
    m[0, 0, 10, 10] = 1
    assert dilate(m, 2).sum().item() == 25
    assert dilate(m, 0) is m


def test_same_seed_same_mask_and_other_seed_another():
    cfg = MaskConfig(rectangles=1, freeform=1)
    a = draw_mask(plan_mask(np.random.default_rng(7), T, H, W, cfg, False), H, W, "cpu")
    b = draw_mask(plan_mask(np.random.default_rng(7), T, H, W, cfg, False), H, W, "cpu")
    c = draw_mask(plan_mask(np.random.default_rng(8), T, H, W, cfg, False), H, W, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_drawing_equals_cpu_drawing():
    cfg = MaskConfig(rectangles=1, freeform=1)
    for i in range(10):
        plan = plan_mask(np.random.default_rng(i), T, H, W, cfg, False)
        assert torch.equal(draw_mask(plan, H, W, "cpu"), draw_mask(plan, H, W, "cuda").cpu())
