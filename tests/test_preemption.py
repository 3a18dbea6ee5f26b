"""The preemption flag and the requeue decision, in this process: the strongest signal wins and is
what every rank acts on; only Slurm's warning (USR1) requeues, from rank 0; a SIGTERM (scancel, the
time limit, a node failure) never does, or a cancelled job would come back. The signals' way through
the batch script and a real Slurm is tests/test_launch.py and tests/test_slurm.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fff_vdi.train.preemption import PreemptionFlag, requeue_after


@pytest.fixture
def scontrol_calls(tmp_path, monkeypatch):
    """A `scontrol` first on PATH that records its arguments; the job id of a Slurm job."""
    calls = tmp_path / "calls"
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def test_the_strongest_signal_wins():
    cpu = torch.device("cpu")
    flag = PreemptionFlag().install()
    try:
        assert flag.agree(cpu) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agree(cpu) == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.agree(cpu) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)  # a later warning does not undo the end of the job
        assert flag.agree(cpu) == signal.SIGTERM
    finally:
        flag.uninstall()


def test_only_the_warning_requeues_and_only_from_rank_0(scontrol_calls):
    assert requeue_after(signal.SIGTERM, is_main=True) is False
    assert requeue_after(signal.SIGUSR1, is_main=False) is False
    assert scontrol_calls() == []
    assert requeue_after(signal.SIGUSR1, is_main=True) is True
    assert scontrol_calls() == ["requeue 4242"]
