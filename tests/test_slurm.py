"""The sbatch templates under a real Slurm (slurm-wlm 22.05 + munge; two nodes made of network
namespaces, tests/slurm_cluster.py), on the CPU with gloo and the tiny pipeline: Slurm's USR1 before
the time limit reaching the training processes through the batch script, the checkpoint, the requeue
(same job id, appended output), the resume with the same per-step losses as an uninterrupted run, one
torchrun per node with the rendezvous on the first node, a node crash that ends the job within
Slurm's node timeout with the node named, the next submission resuming from the last complete
checkpoint on one node, and `scancel` leaving a job cancelled. Root only (namespaces, daemons)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import SLURMD_TIMEOUT_S, SlurmCluster, unavailable_reason, wait_for
from test_train import STEP_SECONDS_BUDGET, losses, overrides

UNAVAILABLE = unavailable_reason()
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"a real Slurm cluster {UNAVAILABLE}")]

STEPS = 6
TIME_LIMIT_MIN = 10  # --time: the run ends long before; the warning comes from a shortened limit
LEAD_S = 90  # --signal=B:USR1@90 (the templates: 300 s)
JOB_TIMEOUT_S = 300  # for any wait on a job: generous for a busy machine, a hang still ends the test
RUNNING = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING"}


def run_args(pipeline: Path, shards: Path, run: Path, **extra) -> list[str]:
    """The test_train overrides at the smallest shapes RAFT takes (2 frames, 1 iteration)."""
    return overrides(pipeline, shards, run, **{
        "experiment.data.num_frames": 2, "experiment.model.raft_iters": 1, "experiment.data.backend": "cpu",
        "experiment.trainer.max_steps": STEPS, "experiment.trainer.log_every": 1, **extra})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_pipeline, synthetic_shards, tmp_path_factory):
    """The uninterrupted run (two processes, no Slurm), started at once in the background: it computes
    while the first job waits for Slurm's signal. Call it for its per-step losses."""
    run = tmp_path_factory.mktemp("reference") / "run"
    args = run_args(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.checkpoint_every": 1000})
    log = run.parent / "reference.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "launch/train.py", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def result() -> dict[int, float]:
        assert proc.wait(timeout=STEP_SECONDS_BUDGET) == 0, f"the reference run failed:\n{log.read_text()[-4000:]}"
        return losses(run)

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def submit(cluster: SlurmCluster, template: str, output: Path, args: list[str], *options: str) -> str:
    return cluster.sbatch([f"--time={TIME_LIMIT_MIN}", f"--signal=B:USR1@{LEAD_S}", f"--output={output}", *options,
                           f"launch/{template}", *args], cwd=REPO,
                          env={"FFF_VDI_REPO": str(REPO), "OMP_NUM_THREADS": "1"})


def state(cluster: SlurmCluster, job: str, output: Path, expected: set[str]) -> dict[str, str]:
    """The job's record; fails with the job's output if it ended in a state not `expected`."""
    info = cluster.job(job)
    if info["JobState"] not in RUNNING | expected:
        text = output.read_text() if output.exists() else "(no output)"
        raise AssertionError(f"job {job} is {info['JobState']} (exit {info['ExitCode']}):\n{text[-6000:]}")
    return info


def wait_for_job(cluster: SlurmCluster, job: str, output: Path, states: set[str], timeout_s: float = JOB_TIMEOUT_S):
    return wait_for(f"job {job} in {sorted(states)}",
                    lambda: (lambda info: info if info["JobState"] in states else None)(
                        state(cluster, job, output, states)), timeout_s)


def wait_for_step(cluster: SlurmCluster, job: str, output: Path, step: int) -> None:
    """Until the job's rank 0 logged `step` (log_every=1) in its output, while the job runs."""
    def logged():
        state(cluster, job, output, set())
        return output.exists() and f"fff_vdi.train: step {step}: loss" in output.read_text()

    wait_for(f"job {job} logging step {step}", logged, JOB_TIMEOUT_S, poll_s=0.2)


def training_workers(run: Path) -> list[int]:
    """The processes the torchrun agents of this run started, on every node (srun's command line
    names torchrun and the run too: its child is no worker)."""
    agents = subprocess.run(["pgrep", "-f", f"[t]orchrun.*{run}"], capture_output=True, text=True).stdout.split()
    return [int(pid) for agent in agents if Path(f"/proc/{agent}/comm").read_text().strip() != "srun"
            for pid in subprocess.run(["pgrep", "-P", agent], capture_output=True, text=True).stdout.split()]


@contextlib.contextmanager
def frozen(run: Path):
    """The run's training processes stopped (SIGSTOP) for the duration: slurmctld checks time limits
    every 30 s, so a signal's moment is known to 30 s only, and a few tiny steps would end first."""
    workers = training_workers(run)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield workers
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def warn_before_time_limit(cluster: SlurmCluster, job: str, output: Path, nodes: int) -> None:
    """Shorten the running job's time limit so that slurmctld's next check (<= 30 s) finds it within
    --signal's lead and sends USR1 to the batch shell; wait until the batch script forwarded it on
    every node; then give the limit back (a requeued job keeps it, and would be warned again)."""
    start = datetime.fromisoformat(cluster.job(job)["StartTime"]).timestamp()
    minutes = (time.time() - start + LEAD_S + 30) // 60  # end - now in (LEAD_S - 30, LEAD_S + 30] s
    cluster.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={int(minutes)}"])

    def forwarded():
        state(cluster, job, output, set())  # a batch shell without the trap dies of the USR1
        return len(re.findall(r"SIGUSR1 sent to \d+ training process", output.read_text())) >= nodes

    wait_for(f"job {job}: USR1 forwarded on {nodes} node(s)", forwarded, 60 + LEAD_S - 30, poll_s=0.2)
    cluster.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={TIME_LIMIT_MIN}"])


def saved_step(run: Path, ranks: int) -> int:
    """The step every rank saved on the preemption signal (the same one: the ranks agree)."""
    steps = {int(m) for r in range(ranks)
             for m in re.findall(r"preemption signal \(SIGUSR1\): saved step (\d+)",
                                 (run / "logs" / f"rank-{r:05d}.log").read_text())}
    assert len(steps) == 1, steps
    return steps.pop()


def complete_checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())


def no_training_left(run: Path) -> bool:
    return not subprocess.run(["pgrep", "-f", f"[l]aunch/train.py.*{run}"], capture_output=True).stdout


def test_one_node_usr1_checkpoint_requeue_resume(cluster, reference, tiny_pipeline, synthetic_shards, tmp_path):
    """train_1node.sbatch, two processes: USR1 before the time limit -> a complete checkpoint -> the
    job requeued by rank 0 (same id) -> back, resumed from that checkpoint, finished; the output file
    holds both runs; every step's loss equals the uninterrupted run's."""
    run, output = tmp_path / "run", tmp_path / "job.out"
    # Checkpoints only on the signal and at the end: the resume can only come from the signal's.
    args = run_args(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.checkpoint_every": 1000})
    job = submit(cluster, "train_1node.sbatch", output, args, "--gpus-per-node=2")
    wait_for_step(cluster, job, output, 1)
    with frozen(run) as workers:
        node = cluster.job(job)["NodeList"]
        assert [cluster.node_of(p) for p in workers] == [node, node]
        warn_before_time_limit(cluster, job, output, nodes=1)
    info = wait_for_job(cluster, job, output, {"COMPLETED"})
    assert (info["Restarts"], info["ExitCode"]) == ("1", "0:0")

    step = saved_step(run, ranks=2)
    assert 1 <= step < STEPS
    assert complete_checkpoints(run) == [step, STEPS]
    assert f"requeued Slurm job {job}" in (run / "logs" / "rank-00000.log").read_text()
    text = output.read_text()
    assert f"{node}: SIGUSR1 sent to 2 training process(es)" in text
    assert text.count("run tiny_cpu: 2 process(es)") == 2  # both runs in the one file: appended
    resumed = text.index(f"resumed from {run}/checkpoints/step-{step:08d} at step {step}")
    assert text.index(f"preemption signal (SIGUSR1): saved step {step}") < resumed
    assert losses(run) == reference()
    assert no_training_left(run)


def test_two_nodes_requeue_then_node_crash_then_one_node_resume(cluster, reference, tiny_pipeline, synthetic_shards,
                                                                tmp_path):
    """train_multinode.sbatch on two nodes, one process each: one torchrun per node, the c10d store
    on the first node, USR1 -> checkpoint -> requeue -> resumed on both nodes; then node2 crashes
    (every process on it killed): the job ends within Slurm's node timeout with node2 named, nothing
    is left running, and train_1node.sbatch (two processes on one node) resumes from the last
    complete checkpoint; cancelled, that job saves and stays cancelled (no requeue on SIGTERM). Every
    step's loss equals the uninterrupted run's."""
    run, output = tmp_path / "run", tmp_path / "job.out"
    args = run_args(tiny_pipeline, synthetic_shards, run)  # a checkpoint after every step
    job = submit(cluster, "train_multinode.sbatch", output, args, "--nodes=2", "--gpus-per-node=1")
    wait_for_step(cluster, job, output, 1)
    with frozen(run) as workers:
        assert sorted(cluster.node_of(p) for p in workers) == ["node1", "node2"]
        listening = {n: cluster.run(["ss", "-Hltn", "sport = :29500"], node=n).stdout.strip() for n in cluster.nodes}
        assert listening["node1"] and not listening["node2"], listening  # the c10d store
        warn_before_time_limit(cluster, job, output, nodes=2)
    wait_for(f"job {job} requeued", lambda: state(cluster, job, output, set())["Restarts"] == "1", JOB_TIMEOUT_S)
    step = saved_step(run, ranks=2)
    wait_for_step(cluster, job, output, step + 1)
    text = output.read_text()
    for node in cluster.nodes:
        assert f"{node}: SIGUSR1 sent to 1 training process(es)" in text
    assert f"resumed from {run}/checkpoints/step-{step:08d} at step {step}" in text

    try:
        cluster.crash_node("node2")
        # Slurm marks the silent node DOWN (slurmctld looks on a 30-s cycle: within SlurmdTimeout + 2
        # cycles) and requeues the job (--requeue): pending until two nodes are up again.
        info = wait_for_job(cluster, job, output, {"PENDING"}, SLURMD_TIMEOUT_S + 60)
        assert info["Restarts"] == "2"
        wait_for("the training processes on node1 to end", lambda: no_training_left(run), 30)
        text = output.read_text()
        assert "Node failure on node2" in text, text[-3000:]  # srun names the node
        assert "Connection closed by peer [10.231.0.2]" in text  # and the surviving rank its address
        last = complete_checkpoints(run)[-1]
        assert step <= last < STEPS

        cluster.run(["scancel", job])  # it would wait for two nodes; a user goes on with one
        output = tmp_path / "one_node.out"
        job = submit(cluster, "train_1node.sbatch", output, args, "--gpus-per-node=2")
        wait_for_step(cluster, job, output, last + 1)
        # ... and cancels that job: Slurm's SIGTERM saves the step under way, and the job stays cancelled.
        cluster.run(["scancel", job])
        wait_for("the cancelled job's training processes to end", lambda: no_training_left(run), JOB_TIMEOUT_S)
        info = cluster.wait_for_state(job, {"CANCELLED", "PENDING", "RUNNING"}, 60)
    finally:
        cluster.start_slurmd("node2")
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")  # not requeued by the trainer
    assert f"resumed from {run}/checkpoints/step-{last:08d} at step {last}" in output.read_text()
    rank0 = (run / "logs" / "rank-00000.log").read_text()
    assert "SIGTERM: Slurm is ending this job" in rank0
    cancelled_at = int(re.findall(r"preemption signal \(SIGTERM\): saved step (\d+)", rank0)[-1])
    assert complete_checkpoints(run)[-1] == cancelled_at > last
    got, expected = losses(run), reference()
    assert got == {s: expected[s] for s in got}
    cluster.wait_for_nodes({"idle"}, 60)  # ReturnToService=2: the restarted node is back in service
