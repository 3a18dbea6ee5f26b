"""bench/seams.py: which frame pairs are at window borders, E_warp restricted to a region, and a tiny run
of the script on the CPU (two blends, three windows)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.eval.metrics import warping_error_per_pair

spec = importlib.util.spec_from_file_location("bench_seams", REPO / "bench" / "seams.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_border_pairs_cover_each_transition():
    # 80 frames, window 25, overlap 6: windows [0,25) [19,44) [38,63) [55,80) (the last overlaps by 8)
    border = bench.border_pairs(80, 25, 6)
    expected = set(range(18, 25)) | set(range(37, 44)) | set(range(54, 63))  # pair t: t + 1 in start..start+known
    assert set(np.flatnonzero(border)) == expected and len(border) == 79
    assert not bench.border_pairs(20, 25, 6).any()  # one window: no border


class ZeroFlow(torch.nn.Module):
    """Stands in for RAFT: no motion, so E_warp of pair t is the squared change from frame t to t + 1."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image1, image2, iters):
        return torch.zeros(image1.shape[0], 2, *image1.shape[-2:])


def test_ewarp_over_a_region():
    video = np.zeros((3, 64, 64, 3), np.uint8)
    video[2, 10:20, 10:20] = 255  # frame 2 changes inside a 10x10 square
    region = np.zeros((3, 64, 64), bool)
    region[1, 10:30, 10:30] = True  # pair 1 (frames 1, 2) scored over 20x20 pixels
    per_pair = warping_error_per_pair(video, video, ZeroFlow(), iters=1, region=region)
    assert np.isnan(per_pair[0]) and per_pair[1] == pytest.approx(100 / 400)  # pair 0 has no pixel in the region
    whole = warping_error_per_pair(video, video, ZeroFlow(), iters=1)
    assert whole[0] == 0 and whole[1] == pytest.approx(100 / 64**2)
    summary = bench.summarise(per_pair, np.array([True, False]))
    assert summary["border"] is None and summary["inside"] == summary["all"] == pytest.approx(per_pair[1] * 1e3)


def test_seams_bench_runs_tiny_on_the_cpu(tiny_pipeline, tmp_path, capsys):
    root = write_synthetic_videos(tmp_path / "video", 1, 8, 96, 160, seed=2)
    out = tmp_path / "seams.json"
    assert bench.main(["--model", str(tiny_pipeline), "--video", str(root), "--video-id", "synth0000", "--out", str(out),
                       "--blends", "crossfade,handover", "--window", "4", "--overlap", "2", "--steps", "1", "--raft-iters", "1",
                       "--height", "128", "--width", "128", "--ewarp-iters", "1", "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert results["windows"] == [[0, 4, 0], [2, 6, 2], [4, 8, 2]] and results["border_pairs"] == [0, 1, 1, 1, 1, 1, 0]
    for blend in ("crossfade", "handover"):
        r = results["blends"][blend]
        assert len(r["per_pair_frame_x1e3"]) == 7 and r["frame"]["border"] > 0 and r["frame"]["inside"] > 0
        assert (tmp_path / "seams" / blend / "inpainted.mp4").is_file()
    assert "| handover |" in capsys.readouterr().out
