"""MetricsWriter: a resumed run keeps one row per step in metrics.jsonl and validation.jsonl."""

from __future__ import annotations

import json

from fff_vdi.train.metrics import MetricsWriter


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resumed_run_drops_the_rows_the_interrupted_run_wrote_after_its_checkpoint(tmp_path):
    first = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    for step in (0, 2, 4):
        first.add_validation(step, {"hole_psnr_db": 10.0 + step, "ewarp_x1e3": float("nan")})
    first.close()
    with open(tmp_path / "validation.jsonl", "a") as f:
        f.write('{"step": 6, "hole_psn')  # a line cut short by a kill

    resumed = MetricsWriter(tmp_path, enabled=True, start_step=2)  # the checkpoint of step 2
    resumed.write(3, {"loss": 30.0})
    resumed.add_validation(4, {"hole_psnr_db": 40.0, "ewarp_x1e3": 1.5})
    resumed.close()

    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    validations = rows(tmp_path / "validation.jsonl")
    assert [(r["step"], r["hole_psnr_db"]) for r in validations] == [(0, 10.0), (2, 12.0), (4, 40.0)]
    assert validations[0]["ewarp_x1e3"] is None and validations[-1]["ewarp_x1e3"] == 1.5  # NaN is written as null
