"""bench/inpaint_memory.py at a tiny size on the CPU: every configuration runs the inpaint command's
code, SAM2 runs, and the JSON and table hold what the GPU run will report."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_inpaint_memory", REPO / "bench" / "inpaint_memory.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_inpaint_memory_bench_runs_tiny_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "inpaint_memory.json"
    assert bench.main(["--out", str(out), "--model", "tiny", "--sizes", "128x128", "--frames", "3", "--steps", "1",
                       "--raft-iters", "1", "--configs", "auto,offload_decode2", "--sam", "tiny", "--sam-frames", "3",
                       "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert results["card"] == "cpu" and results["cap_gib"] is None
    runs = {r["config"]: r for r in results["inpaint"]}
    assert sorted(runs) == ["auto", "offload_decode2"]
    assert runs["offload_decode2"]["settings"] == "offload on, feed-forward chunking on, VAE chunk 2"
    assert runs["auto"]["settings"] == "offload off, feed-forward chunking off, VAE chunk 8"  # nothing to save on a CPU
    for run in runs.values():
        assert not run["oom"] and run["seconds"] > 0 and run["seconds_per_frame"] == run["seconds"] / 3
        assert (run["height"], run["width"], run["frames"]) == (128, 128, 3) and run["estimate_gib"] > 0
    (sam,) = results["sam2"]
    assert sam["architecture"] == "tiny" and not sam["oom"] and sam["seconds_per_frame"] > 0 and sam["parameters_m"] > 0
    table = capsys.readouterr().out
    assert "| inpaint offload_decode2 | 128x128 |" in table and "| SAM2 tiny | 128x128 | 3 frames |" in table
