"""Slurm preemption: a signal only sets a flag; the trainer acts on it at a step boundary.

Slurm sends SIGUSR1 (`#SBATCH --signal=B:USR1@300`, trapped by the batch script and forwarded to the
workers) or SIGTERM before it kills a job. Every rank checks the flag at the end of each step and the
ranks agree (any rank signalled -> all stop), so they save the same step together, requeue and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart interrupted system calls: the signal can land in any thread, also one blocked in
            # a C++ socket call of the rendezvous or a collective, which would otherwise fail with EINTR.
            signal.siginterrupt(sig, False)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_slurm_job() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). True if a requeue was issued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        log.info("requeued Slurm job %s", job)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue Slurm job %s: %s (resubmit it; it resumes from the checkpoint)", job, e)
        return False
