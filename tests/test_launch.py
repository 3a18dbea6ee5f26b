"""The Slurm templates' signal path, run for real on the CPU: the batch shell traps USR1, forwards it
to the torchrun workers through srun (a stand-in that runs the command here), the workers save a
complete checkpoint, rank 0 requeues the job (a stand-in scontrol) and everyone exits 0. Under a real
Slurm: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_train import losses, overrides, wait_for_first_step


@pytest.fixture
def fake_srun(tmp_path):
    """An `srun` that drops its options and runs the command on this machine, and an `scontrol` that
    records its arguments in bin/scontrol.calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {bin_dir}/scontrol.calls\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def training_workers(run_dir) -> list[str]:
    """PIDs of the processes the torchrun agent of this run started."""
    agents = subprocess.run(["pgrep", "-f", f"[t]orchrun.*{run_dir}"], capture_output=True, text=True).stdout.split()
    return [pid for agent in agents
            for pid in subprocess.run(["pgrep", "-P", agent], capture_output=True, text=True).stdout.split()]


@pytest.mark.parametrize("when", ["during_setup", "mid_run"])
def test_batch_script_forwards_usr1_to_the_workers(when, fake_srun, tiny_pipeline, synthetic_shards, tmp_path):
    """Mid-run is the usual case; during setup (imports, model build, data) the flag must already be
    installed, or the signal's default action kills a rank."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun beside {sys.executable}")
    run = tmp_path / "run"
    args = " ".join(overrides(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.max_steps": 200,
                                                                       "experiment.trainer.checkpoint_every": 1000}))
    driver = tmp_path / "job.sh"
    # The body of launch/train_1node.sbatch with this machine's torchrun.
    driver.write_text(f"set -uo pipefail\nsource launch/common.sh\n"
                      f"run_and_wait srun --ntasks=1 {torchrun} --standalone --nproc-per-node=2 launch/train.py {args}\n")
    # A job id of its own: the forwarding signals only this job's training processes (not those of
    # another run on the machine), and the requeue goes to the fake scontrol.
    job_id = str(os.getpid())
    env = {**os.environ, "FFF_VDI_REPO": str(REPO), "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": job_id,
           "OMP_NUM_THREADS": "1", "PATH": f"{fake_srun}:{os.environ['PATH']}"}
    job = subprocess.Popen(["bash", str(driver)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        if when == "mid_run":
            wait_for_first_step(run)
        else:
            deadline = time.time() + 120
            while len(training_workers(run)) < 2 and time.time() < deadline:
                time.sleep(0.1)
            assert len(training_workers(run)) == 2, "torchrun never started its two workers"
            time.sleep(2.0)  # the workers are importing torch and diffusers now; setup takes ~10 s
            assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()
        job.send_signal(signal.SIGUSR1)  # what Slurm does with --signal=B:USR1@300
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    assert "SIGUSR1 received, forwarding" in out
    assert (fake_srun / "scontrol.calls").read_text() == f"requeue {job_id}\n"  # by rank 0 only
    for rank in (0, 1):  # both ranks saw the flag (agreed across ranks) and stopped at the same step
        assert "preemption signal (SIGUSR1)" in (run / "logs" / f"rank-{rank:05d}.log").read_text()
    done = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(done) == 1
    step = json.loads((done[0] / "state.json").read_text())["step"]
    assert step == max(losses(run)) and step < 200
    if when == "during_setup":
        assert step == 1  # held until the first step boundary
