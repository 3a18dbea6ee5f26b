"""The trainer on the CPU with gloo and the tiny pipeline: exact resume (also twice, from two nodes, and
from two processes to one) and HSDP against one straight run. The options the published recipe leaves
off and a non-finite loss: tests/test_train_options.py; learning: tests/test_learning.py. Preemption by
SIGUSR1 through the sbatch template's forwarding is tests/test_launch.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from fff_vdi.train.checkpoint import list_checkpoints

STEP_SECONDS_BUDGET = 600


def overrides(pipeline: Path, shards: Path, out: Path, **extra) -> list[str]:
    base = {
        "experiment": "tiny_cpu",
        "experiment.model.pretrained": str(pipeline),
        "experiment.model.raft_iters": 2,
        "experiment.data.shards": str(shards),
        "experiment.data.num_frames": 4,
        "experiment.data.height": 128,
        "experiment.data.width": 128,
        "experiment.data.num_workers": 0,
        "experiment.output_dir": str(out),
        "experiment.trainer.validate_every": 0,
        "experiment.trainer.export_at_end": "false",
        "experiment.trainer.progress_bar": "false",
        "experiment.trainer.deterministic": "true",
        "experiment.trainer.checkpoint_every": 1,
        "experiment.trainer.keep_checkpoints": 10,
        "experiment.trainer.max_steps": 6,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(args: list[str], nproc: int, check: bool = True, faults: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun launch/train.py ARGS; with `faults` (FFF_VDI_TEST_* variables) tests/train_with_faults.py,
    which injects them."""
    script = "tests/train_with_faults.py" if faults else "launch/train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=STEP_SECONDS_BUDGET,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(faults or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_together(runs: list[list[str]]) -> None:
    """Independent single-process runs side by side (one core each): half the wall time of `launch` in turn."""
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "launch/train.py",
             *args] for args in runs]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for cmd in cmds]
    try:
        outputs = [p.communicate(timeout=STEP_SECONDS_BUDGET)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise AssertionError(f"training exited {p.returncode}\n{out[-6000:]}")


def wait_for_first_step(run_dir: Path, timeout_s: float = 300) -> None:
    """Block until rank 0 logged a complete step (metrics.jsonl itself is created during setup)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return
        time.sleep(0.5)
    raise AssertionError(f"training never logged a step within {timeout_s:.0f} s ({path})")


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses from metrics.jsonl (a resumed run appends; a step logged twice must agree;
    a skipped step's loss is null)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert out.get(rec["step"], rec["loss"]) == rec["loss"]
        out[rec["step"]] = rec["loss"]
    return out


def interrupted_copy(run: Path, last_checkpoint: int, run_dir: Path) -> None:
    """A copy of `run` as a job killed after its last logged step sees it: every log, metric and
    TensorBoard file, but no checkpoint after step `last_checkpoint`."""
    shutil.copytree(run, run_dir)
    for step, path in list_checkpoints(run_dir / "checkpoints", complete_only=False):
        if step > last_checkpoint:
            shutil.rmtree(path)


def tensorboard_steps(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def straight_run(tiny_pipeline, synthetic_shards, tmp_path_factory) -> Path:
    """Six deterministic steps on two processes, a checkpoint after every step."""
    run = tmp_path_factory.mktemp("train") / "straight"
    launch(overrides(tiny_pipeline, synthetic_shards, run), nproc=2)
    return run


def test_straight_run_writes_everything(straight_run):
    steps = losses(straight_run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    ckpts = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}" for s in range(1, 7)]
    assert all((straight_run / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)
    state = json.loads((straight_run / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["data"]["position"] == 6 * 2  # 6 global batches of 2 ranks x 1 clip
    assert sorted(os.listdir(straight_run / "checkpoints" / "step-00000006" / "rng")) == ["rank-00000.pt", "rank-00001.pt"]
    assert (straight_run / "config.yaml").exists()
    assert sorted(os.listdir(straight_run / "logs")) == ["rank-00000.log", "rank-00001.log"]
    assert any(p.name.startswith("events.out.tfevents") for p in (straight_run / "tensorboard").iterdir())
    record = json.loads((straight_run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "lr", "grad_norm", "clips_per_s", "frames_per_s", "data_wait_share", "peak_memory_gib"):
        assert key in record


def test_two_processes_resume_as_one(straight_run, tiny_pipeline, synthetic_shards, tmp_path):
    """Killed after logging step 6 with step 3 its last checkpoint: steps 4-6 run again, on one process.
    The killed run's rows for them are dropped (issue 17.4: metrics.jsonl read 1, 2, 3, 4, 5, 6, 4, 5)."""
    run = tmp_path / "one"
    interrupted_copy(straight_run, 3, run)
    proc = launch(overrides(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.max_steps": 5}), nproc=1)
    assert "saved on 2 ranks, resuming on 1" in proc.stderr
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:3] == (straight_run / "metrics.jsonl").read_text().splitlines()[:3]
    resumed = losses(run)
    assert tensorboard_steps(run, "train/loss") == pytest.approx(resumed, rel=1e-6)  # 4 and 5 of this run only
    state = json.loads((run / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["data"]["position"] == 3 * 2 + 2 * 1  # the stream continues where two ranks left it


def test_two_nodes_then_two_resumes_on_one_node_match_the_straight_run(straight_run, tiny_pipeline, synthetic_shards,
                                                                        tmp_path):
    """3 steps by two torchrun agents with --nnodes 2 and a c10d rendezvous on localhost (how the
    multi-node sbatch template starts them), resumed on one node to step 5, resumed again to step 6:
    every step's loss equals the uninterrupted run's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "two_nodes"
    args = overrides(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.max_steps": 3})
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fff-vdi-test",
                          "launch/train.py", *args],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=STEP_SECONDS_BUDGET)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    expected = losses(straight_run)
    assert losses(run) == {s: expected[s] for s in (1, 2, 3)}
    launch(overrides(tiny_pipeline, synthetic_shards, run), nproc=2, faults={"FFF_VDI_TEST_STOP_AFTER_STEPS": "2"})
    assert losses(run) == {s: expected[s] for s in (1, 2, 3, 4, 5)}
    launch(overrides(tiny_pipeline, synthetic_shards, run), nproc=2)  # one node, 2 processes, to step 6
    assert losses(run) == expected


def test_hsdp_replicates_across_groups(straight_run, tiny_pipeline, synthetic_shards, tmp_path):
    """HSDP on two processes as two replica groups of one shard each, with the frozen parameters
    sharded too (parallel.shard_frozen), gives the losses of plain FSDP with them replicated."""
    hsdp = tmp_path / "hsdp"
    launch(overrides(tiny_pipeline, synthetic_shards, hsdp, **{"experiment.trainer.max_steps": 2,
                                                                "experiment.parallel.hsdp_replicas": 2,
                                                                "experiment.parallel.shard_frozen": "true"}), nproc=2)
    fsdp, replicated = losses(straight_run), losses(hsdp)
    assert sorted(replicated) == [1, 2]
    assert all(replicated[s] == pytest.approx(fsdp[s], rel=1e-5) for s in replicated)
