"""The clip stream and per-visit plans: deterministic, rank-count independent, policies as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fff_vdi.config import DataConfig
from fff_vdi.data.plan import draw_crop, draw_window, is_eligible, plan_clip
from fff_vdi.data.sampler import ClipStream, RankSlice


def test_each_epoch_visits_every_video_once_in_a_seeded_order():
    stream = ClipStream(num_videos=7, seed=5)
    for epoch in range(3):
        visits = [stream.video_at(epoch * 7 + k) for k in range(7)]
        assert sorted(visits) == list(range(7))
    assert [stream.video_at(k) for k in range(7)] != [stream.video_at(7 + k) for k in range(7)]
    again = ClipStream(num_videos=7, seed=5)
    assert [again.video_at(k) for k in range(21)] == [stream.video_at(k) for k in range(21)]
    other = ClipStream(num_videos=7, seed=6)
    assert [other.video_at(k) for k in range(21)] != [stream.video_at(k) for k in range(21)]


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 2), (4, 1), (3, 2)])
def test_global_batches_cover_the_stream_in_order_for_any_world_size(world_size, batch_size):
    start = 5
    slices = [RankSlice(start, r, world_size, batch_size) for r in range(world_size)]
    covered = []
    for g in range(6):
        for s in slices:
            covered += s.positions(g)
    assert covered == list(range(start, start + 6 * world_size * batch_size))
    # Samples laid end to end agree with the batch view.
    s = slices[-1]
    assert [s.position_of_sample(k) for k in range(2 * batch_size)] == s.positions(0) + s.positions(1)
    assert s.next_start(3) == start + 3 * world_size * batch_size


def test_resume_on_another_world_size_continues_without_repeats_or_gaps():
    # 2 ranks x batch 2 for 3 steps, then 3 ranks x batch 2 from the saved position.
    first = [p for g in range(3) for r in range(2) for p in RankSlice(0, r, 2, 2).positions(g)]
    position = RankSlice(0, 0, 2, 2).next_start(3)
    second = [p for g in range(2) for r in range(3) for p in RankSlice(position, r, 3, 2).positions(g)]
    assert first + second == list(range(12 + 12))


def cfg(**kw) -> DataConfig:
    base = dict(shards="unused", num_frames=5, height=64, width=128, frame_steps=[1, 2, 3])
    base.update(kw)
    return DataConfig(**base)


def test_eligibility_by_policy():
    c = cfg(short_video_policy="skip")  # every step must fit: (5-1)*3+1 = 13
    assert not is_eligible(12, c) and is_eligible(13, c)
    c = cfg(short_video_policy="smaller_step")
    assert not is_eligible(4, c) and is_eligible(5, c)
    c = cfg(short_video_policy="reflect_pad")
    assert not is_eligible(1, c) and is_eligible(2, c)


def test_windows_use_configured_steps_and_fit():
    c = cfg(short_video_policy="smaller_step")
    rng = np.random.default_rng(0)
    steps = set()
    for _ in range(300):
        idx, step = draw_window(rng, 9, c)  # step 3 does not fit 9 frames: falls back to 2
        steps.add(step)
        assert len(idx) == 5 and idx[0] >= 0 and idx[-1] < 9
        assert all(b - a == step for a, b in zip(idx, idx[1:]))
    assert steps == {1, 2}


def test_reflect_pad_plays_short_videos_back_and_forth():
    c = cfg(num_frames=8, short_video_policy="reflect_pad")
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx, step = draw_window(rng, 3, c)
        assert step == 1 and len(idx) == 8 and set(idx) <= {0, 1, 2}
        assert all(abs(b - a) == 1 for a, b in zip(idx, idx[1:]))


def test_crops_keep_the_output_aspect_and_stay_inside():
    c = cfg(height=64, width=128, crop_scale=[0.5, 1.0])
    rng = np.random.default_rng(2)
    for fh, fw in [(720, 1280), (480, 480), (240, 432), (1000, 300)]:
        for _ in range(100):
            (y0, x0), (y1, x1) = draw_crop(rng, (fh, fw), c)
            assert 0 <= y0 < y1 <= 1 + 1e-9 and 0 <= x0 < x1 <= 1 + 1e-9
            aspect = (x1 - x0) * fw / ((y1 - y0) * fh)
            assert aspect == pytest.approx(2.0, rel=1e-6)
            largest = min(fw, fh * 2.0) * min(fw, fh * 2.0) / 2.0
            area = (x1 - x0) * fw * (y1 - y0) * fh
            assert 0.5 - 1e-6 <= area / largest <= 1 + 1e-6


def test_same_position_same_plan_whatever_else_happens():
    c = cfg(short_video_policy="smaller_step")
    stream = ClipStream(10, seed=c.seed)
    a = plan_clip(stream.visit_rng(42), 42, 3, 30, (96, 160), None, c)
    _ = plan_clip(stream.visit_rng(41), 41, 3, 30, (96, 160), None, c)
    b = plan_clip(stream.visit_rng(42), 42, 3, 30, (96, 160), None, c)
    assert a.frame_indices == b.frame_indices and a.crop_start == b.crop_start and a.flip == b.flip
    np.testing.assert_array_equal(a.mask.boxes, b.mask.boxes)


def test_flip_probability_is_respected():
    c = cfg(hflip_prob=0.25)
    stream = ClipStream(10, seed=0)
    flips = [plan_clip(stream.visit_rng(p), p, 0, 30, (96, 160), None, c).flip for p in range(2000)]
    assert abs(np.mean(flips) - 0.25) < 0.03
    assert not any(plan_clip(stream.visit_rng(p), p, 0, 30, (96, 160), None, cfg(hflip_prob=0.0)).flip
                   for p in range(200))
    assert math.isclose(cfg().hflip_prob, 0.5)
