"""bench/data.py on the CPU (PIL backend): our loader, its variants and stages, and the published baseline."""

from __future__ import annotations

import json

from conftest import run_tool

SMALL = ["--videos", "2", "--frames", "12", "--frames-per-clip", "4", "--batch-clips", "1", "--batches", "2",
         "--baseline-workers", "1"]


def test_bench_measures_ours_its_variants_and_the_baseline(tmp_path):
    out = tmp_path / "data.json"
    run_tool("bench/data.py", *SMALL, "--workdir", str(tmp_path / "work"), "--out", str(out),
             "--variants", "stage=source", "workers=1:batch=2", "stage=pipeline")
    results = json.loads(out.read_text())
    assert results["ours"]["backend"] == "cpu" and results["ours"]["frames_per_s"] > 0
    source, batch2, pipeline = results["variants"]
    assert pipeline["stage"] == "pipeline" and pipeline["frames_per_s"] > 0
    assert source["variant"] == "stage=source" and source["stage"] == "source" and source["frames_per_s"] > 0
    assert batch2["reader_workers"] == 1 and batch2["batch_clips"] == 2 and batch2["frames_per_s"] > 0
    assert results["baseline"]["frames_per_s"] > 0 and results["speedup_per_core"] > 0


def test_a_bad_variant_is_named_before_anything_runs(tmp_path):
    proc = run_tool("bench/data.py", *SMALL, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "d.json"),
                    "--variants", "workers=2:speed=9", check=False)
    assert proc.returncode != 0
    assert "'speed=9' is not KEY=VALUE" in proc.stderr and "workers" in proc.stderr
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "work").exists()
    proc = run_tool("bench/data.py", *SMALL, "--out", str(tmp_path / "d.json"), "--variants", "hw=lots", check=False)
    assert proc.returncode != 0 and "hw takes a float, not 'lots'" in proc.stderr
