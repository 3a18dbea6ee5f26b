"""Slurm preemption: a signal only sets a flag; the trainer acts on it at a step boundary.

Two signals, two meanings. SIGUSR1 is Slurm's warning before the time limit (`#SBATCH
--signal=B:USR1@300`, trapped by the batch script and forwarded to the workers): save, requeue the job,
exit 0. SIGTERM is Slurm ending the job itself (scancel, the time limit, a node failure, a requeue
already under way): save if there is time, exit, and never requeue, or a cancelled job would come
back by itself, again and again. Every rank checks its flag at the end of each step and the ranks
agree on the strongest signal any of them received, so they save the same step together.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Optional

log = logging.getLogger(__name__)


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # in increasing strength: TERM overrides USR1

    def __init__(self):
        self.received: Optional[signal.Signals] = None  # the strongest signal received on this rank
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart interrupted system calls: the signal can land in any thread, also one blocked in
            # a C++ socket call of the rendezvous or a collective, which would otherwise fail with EINTR.
            signal.siginterrupt(sig, False)
        return self

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None or self.SIGNALS.index(sig) > self.SIGNALS.index(self.received):
            self.received = sig

    def code(self) -> int:
        """This rank's signal as a number that orders by strength: 0 none, 1 USR1, 2 TERM."""
        return self.SIGNALS.index(self.received) + 1 if self.received else 0

    def signal_of(self, code: int) -> Optional[signal.Signals]:
        return self.SIGNALS[code - 1] if code else None

    def agree(self, device) -> Optional[signal.Signals]:
        """Collective: the signal every rank acts on at this step boundary (the strongest any rank
        received), None if no rank was signalled. (The training step agrees on `code()` within its
        one synchronisation instead.)"""
        from fff_vdi.distributed.env import max_over_ranks  # torch: not at import time (launch/train.py)

        return self.signal_of(int(max_over_ranks(self.code(), device).item()))

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_after(signalled: signal.Signals, is_main: bool) -> bool:
    """After the checkpoint of a preempted step: requeue the job (rank 0) if Slurm warned of its time
    limit (USR1), not if it is ending the job (TERM). True if a requeue was issued."""
    if signalled != signal.SIGUSR1:
        log.info("%s: Slurm is ending this job (scancel, time limit, node failure or a requeue under way): "
                 "not requeued; a new submission resumes from the checkpoint", signalled.name)
        return False
    return is_main and requeue_slurm_job()


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
