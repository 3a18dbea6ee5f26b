"""bench/shard.py on the CPU: the sharder timed per worker count beside the machine's own ceilings."""

from __future__ import annotations

import json

from conftest import run_tool


def test_bench_times_the_sharder_against_the_decode_and_core_ceilings(tmp_path):
    out = tmp_path / "shard.json"
    run_tool("bench/shard.py", "--videos", "4", "--frames", "5", "--height", "72", "--width", "128",
             "--workers", "1", "2", "--repeats", "1", "--data", str(tmp_path / "src"), "--out-dir", str(tmp_path),
             "--results", str(out))
    results = json.loads(out.read_text())
    assert results["identical_output_across_worker_counts"] is True
    assert results["dataset"]["frames"] == 20
    topology = results["machine"]["topology"]
    assert topology["logical_cpus"] >= 1
    assert topology["physical_cores"] in (None, *range(1, topology["logical_cpus"] + 1))
    one, two = results["runs"]
    assert [one["workers"], two["workers"]] == [1, 2]
    for run in results["runs"]:
        assert run["frames_per_s"] > 0 and run["decode_ceiling_frames_per_s"] > 0 and run["core_ceiling_per_s"] > 0
        assert run["timeline"]["last_video_s"] >= run["timeline"]["first_video_s"] > 0
    assert one["scaling_efficiency"] == one["core_scaling_efficiency"] == 1.0
    assert two["core_scaling_efficiency"] == round(two["core_ceiling_per_s"] / (2 * one["core_ceiling_per_s"]), 2)
    assert not list(tmp_path.glob("tmp*")), "the shards' scratch folder is removed"
