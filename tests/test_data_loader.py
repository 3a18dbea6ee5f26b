"""The loader contract on both backends: shapes, determinism, equal batches per rank, exact resume
(same and another number of ranks), CPU/DALI agreement, object masks, bad-input errors, preview."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from fff_vdi.config import DataConfig, MaskConfig
from fff_vdi.data.loader import ClipLoader
from fff_vdi.data.shards import ShardSet
from fff_vdi.errors import DataError
from conftest import run_tool


def data_cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), num_frames=6, height=64, width=96, batch_size=2, frame_steps=[1, 2],
                num_workers=0, short_video_policy="smaller_step",
                masks=MaskConfig(rectangles=1.0, freeform=1.0))
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_follow_the_contract(synthetic_shards):
    loader = ClipLoader(data_cfg(synthetic_shards), backend="cpu")
    b = next(loader)
    assert b["pixel_values"].shape == (2, 6, 3, 64, 96) and b["pixel_values"].dtype == torch.float32
    assert b["mask_values"].shape == (2, 6, 1, 64, 96)
    assert -1.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0
    assert b["pixel_values"].std() > 0.05  # real image content
    assert set(torch.unique(b["mask_values"]).tolist()) <= {0.0, 1.0}
    assert len(b["video_ids"]) == 2 and all(v.startswith("synth") for v in b["video_ids"])
    assert b["positions"] == [0, 1] and b["frame_indices"].shape == (2, 6)
    # Short videos (5 frames) cannot give 6 frames under smaller_step.
    assert len(loader.source) == len([v for v in loader.shards.videos if v.num_frames >= 6])


def test_same_seed_same_batches_and_another_seed_others(synthetic_shards):
    a = take(ClipLoader(data_cfg(synthetic_shards), backend="cpu"), 3)
    b = take(ClipLoader(data_cfg(synthetic_shards, num_workers=2), backend="cpu"), 3)
    c = take(ClipLoader(data_cfg(synthetic_shards, seed=9), backend="cpu"), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["mask_values"], y["mask_values"])
    assert not all(torch.equal(x["pixel_values"], z["pixel_values"]) for x, z in zip(a, c))


def clips_by_position(batches) -> dict:
    out = {}
    for b in batches:
        for i, p in enumerate(b["positions"]):
            out[p] = (b["pixel_values"][i], b["mask_values"][i])
    return out


def test_ranks_step_in_lockstep_and_split_the_stream(synthetic_shards):
    cfg = data_cfg(synthetic_shards, batch_size=1)
    ranks = [ClipLoader(cfg, rank=r, world_size=2, backend="cpu") for r in range(2)]
    n = 2 * ranks[0].batches_per_epoch + 1  # crosses two epoch ends
    per_rank = [take(l, n) for l in ranks]
    assert [len(x) for x in per_rank] == [n, n]
    seen = sorted(p for batches in per_rank for b in batches for p in b["positions"])
    assert seen == list(range(2 * n))  # no clip dropped or repeated, across epoch ends
    # The clip at a position does not depend on who read it.
    single = clips_by_position(take(ClipLoader(replace(cfg, batch_size=2), backend="cpu"), n))
    for batches in per_rank:
        for p, (pix, mask) in clips_by_position(batches).items():
            assert torch.equal(pix, single[p][0]) and torch.equal(mask, single[p][1])


def test_resume_gives_exactly_the_uninterrupted_batches(synthetic_shards):
    cfg = data_cfg(synthetic_shards)
    straight = take(ClipLoader(cfg, backend="cpu"), 5)
    first = ClipLoader(cfg, backend="cpu")
    take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint state.json)
    resumed = ClipLoader(cfg, backend="cpu")
    resumed.load_state_dict(state)
    for x, y in zip(straight[2:], take(resumed, 3)):
        assert x["positions"] == y["positions"]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["mask_values"], y["mask_values"])


def test_resume_on_another_number_of_ranks_continues_the_stream(synthetic_shards):
    cfg = data_cfg(synthetic_shards, batch_size=1)
    two = [ClipLoader(cfg, rank=r, world_size=2, backend="cpu") for r in range(2)]
    before = [p for l in two for b in take(l, 3) for p in b["positions"]]
    one = ClipLoader(replace(cfg, batch_size=2), backend="cpu")
    one.load_state_dict(two[0].state_dict())
    after = [p for b in take(one, 2) for p in b["positions"]]
    assert sorted(before) + after == list(range(10))


def test_state_from_other_shards_is_refused(synthetic_shards):
    loader = ClipLoader(data_cfg(synthetic_shards), backend="cpu")
    state = dict(loader.state_dict(), num_videos=999)
    with pytest.raises(DataError, match="num_videos=999"):
        loader.load_state_dict(state)


def test_dali_cpu_graph_matches_the_pil_backend(synthetic_shards):
    pytest.importorskip("nvidia.dali")
    cfg = data_cfg(synthetic_shards, num_workers=1)
    pil = take(ClipLoader(cfg, backend="cpu"), 2)
    dali = take(ClipLoader(cfg, backend="dali"), 2)
    for x, y in zip(pil, dali):
        assert x["positions"] == y["positions"]
        assert torch.equal(x["frame_indices"], y["frame_indices"]) and torch.equal(x["flips"], y["flips"])
        assert torch.equal(x["mask_values"], y["mask_values"])  # masks are exact
        # Pixels differ only by resize rounding (both use libjpeg-turbo on the CPU). Stated tolerance,
        # in grey levels of 255: mean below 0.5, max at most 2 (measured: 0.17 and 1).
        levels = (x["pixel_values"] - y["pixel_values"]).abs() * 127.5
        assert levels.mean() < 0.5, levels.mean()
        assert levels.max() <= 2.0 + 1e-3, levels.max()


def test_object_masks_come_from_the_annotations(synthetic_shards):
    cfg = data_cfg(synthetic_shards, masks=MaskConfig(rectangles=0.0, objects=1.0), hflip_prob=0.0,
                   crop_scale=[1.0, 1.0])
    loader = ClipLoader(cfg, backend="cpu")
    b = next(loader)
    assert b["mask_kinds"] == ["objects", "objects"]
    ratio = b["mask_values"].mean().item()
    assert 0.005 < ratio < 0.6
    # The hole is the annotation, nearest-sampled over the plan's crop box.
    from fff_vdi.data.clips import decode_labels

    plan = loader.source.plan(0)
    video = loader.source.video(plan)
    labels = decode_labels(loader.shards.read_mask(video, plan.frame_indices[0]), "x")
    (y0, x0), (y1, x1) = plan.crop_start, plan.crop_end
    rows = ((y0 + (np.arange(64) + 0.5) / 64 * (y1 - y0)) * video.height).astype(int)
    cols = ((x0 + (np.arange(96) + 0.5) / 96 * (x1 - x0)) * video.width).astype(int)
    expected = labels[rows][:, cols]
    hole = b["mask_values"][0, 0, 0].numpy() > 0
    assert hole.any()
    assert np.array_equal(hole, expected > 0) or np.array_equal(hole, np.isin(expected, [expected[hole][0]]))


# -- bad input --------------------------------------------------------------------------------


@pytest.fixture
def shard_copy(synthetic_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(synthetic_shards, dst)
    return dst


def test_missing_shard_is_named(shard_copy):
    victim = sorted(shard_copy.glob("train-*.tar"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        ClipLoader(data_cfg(shard_copy), backend="cpu")


def test_missing_manifest_says_how_to_finish(shard_copy):
    (shard_copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="--resume"):
        ClipLoader(data_cfg(shard_copy), backend="cpu")


def test_index_mismatch_is_named(shard_copy):
    index = sorted(shard_copy.glob("train-*.index.json"))[0]
    data = json.loads(index.read_text())
    data["sha256"] = "0" * 64
    index.write_text(json.dumps(data))
    with pytest.raises(DataError, match="index mismatch"):
        ClipLoader(data_cfg(shard_copy), backend="cpu")


def corrupt_first_frame(shard_dir, video):
    offset, size, _ = video.frames[0]
    with open(shard_dir / video.shard, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return video


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_corrupt_member_is_named_not_hung(shard_copy, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = data_cfg(shard_copy, batch_size=1, num_workers=1)
    loader = ClipLoader(cfg, backend=backend)
    video = corrupt_first_frame(shard_copy, loader.source.videos[0])
    # Read clips until one touches the corrupt frame.
    reads_it = next(p for p in range(200) if loader.source.video(loader.source.plan(p)).key == video.key
                    and 0 in loader.source.plan(p).frame_indices)
    with pytest.raises(Exception, match=rf"{video.key}\.f00000\.jpg"):
        for _ in range(reads_it + 1):
            next(loader)
    loader.close()


def test_undecodable_frame_is_named(synthetic_shards, monkeypatch):
    monkeypatch.setattr(ShardSet, "read_frame", lambda self, video, i: b"not a jpeg")
    loader = ClipLoader(data_cfg(synthetic_shards), backend="cpu")
    with pytest.raises(DataError, match=r"\.f\d{5}\.jpg cannot be decoded"):
        next(loader)


def test_preview_writes_a_grid_and_statistics(synthetic_shards, tmp_path):
    out, stats = tmp_path / "preview.png", tmp_path / "stats.json"
    run_tool("-m", "fff_vdi.data.preview", "--shards", str(synthetic_shards), "--out", str(out), "--json", str(stats),
             "--batches", "2", "--device", "cpu", "--frames", "6", "--height", "64", "--width", "96",
             "--batch-size", "2", "--workers", "0", "--masks", "mixed")
    from PIL import Image

    img = Image.open(out)
    assert img.size == (6 * 96, 4 * 64)  # min(8, T) frames per row, one row per clip
    s = json.loads(stats.read_text())
    assert s["shapes"]["pixel_values"] == [2, 6, 3, 64, 96]
    assert -1 <= s["value_range"][0] < s["value_range"][1] <= 1
    assert 0 < s["mask_ratio"]["p50"] < 1 and s["clips_per_s"] > 0


def test_preview_rejects_a_missing_folder(tmp_path):
    proc = run_tool("-m", "fff_vdi.data.preview", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "p.png"),
                    "--device", "cpu", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "manifest.json" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
def test_dali_gpu_decode_matches_the_pil_backend(synthetic_shards):
    """The CPU/GPU contract: same plans and masks; pixels differ by decoder (nvJPEG vs libjpeg-turbo)
    and resize numerics only. Stated tolerance in grey levels of 255: mean below 1.5, 99th percentile
    at most 8."""
    pytest.importorskip("nvidia.dali")
    cfg = data_cfg(synthetic_shards, num_workers=1)
    pil = take(ClipLoader(cfg, backend="cpu"), 3)
    gpu = take(ClipLoader(cfg, device="cuda", backend="dali"), 3)
    for x, y in zip(pil, gpu):
        assert x["positions"] == y["positions"] and torch.equal(x["frame_indices"], y["frame_indices"])
        assert torch.equal(x["mask_values"], y["mask_values"].cpu())
        levels = (x["pixel_values"] - y["pixel_values"].cpu()).abs() * 127.5
        stats = f"mean {levels.mean():.3f}, p99 {levels.flatten().kthvalue(int(0.99 * levels.numel())).values:.2f}, max {levels.max():.1f}"
        print("DALI GPU vs PIL:", stats)
        assert levels.mean() < 1.5, stats
        assert levels.flatten().kthvalue(int(0.99 * levels.numel())).values <= 8, stats
