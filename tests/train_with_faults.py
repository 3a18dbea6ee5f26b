"""launch/train.py with faults injected by monkeypatching, for the tests only (torchrun starts it instead
of launch/train.py, with the same Hydra overrides); the product's configuration has no test hooks.

    FFF_VDI_TEST_NAN_AT_STEP=N       the loss of (1-based) optimizer step N is NaN on every rank
    FFF_VDI_TEST_STOP_AFTER_STEPS=K  this process sends itself SIGUSR1 (a preemption) as its K-th step
                                     starts, so every rank saves that step and exits 0
    FFF_VDI_TEST_FULL_DISK_ON_RANK=R[:BYTES]  the disk is full for rank R: its writes past BYTES (default
                                     1 MB: a checkpoint's shards are larger) in a file fail (EFBIG, as
                                     ENOSPC would)
"""

import os
import resource
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fff_vdi.train.step as step_module  # noqa: E402

NAN_AT_STEP = int(os.environ.get("FFF_VDI_TEST_NAN_AT_STEP", "0"))
STOP_AFTER_STEPS = int(os.environ.get("FFF_VDI_TEST_STOP_AFTER_STEPS", "0"))
current = {"step": -1, "calls": 0}
original_call, original_loss = step_module.TrainStep.__call__, step_module.edm_loss


def call(self, batches, step, **kwargs):
    current["step"] = step
    current["calls"] += 1
    if current["calls"] == STOP_AFTER_STEPS:
        signal.raise_signal(signal.SIGUSR1)  # launch/train.py's preemption flag takes it
    return original_call(self, batches, step, **kwargs)


def loss(*args, **kwargs):
    value = original_loss(*args, **kwargs)
    return value * float("nan") if current["step"] + 1 == NAN_AT_STEP else value


FULL_DISK_RANK, _, FULL_DISK_BYTES = os.environ.get("FFF_VDI_TEST_FULL_DISK_ON_RANK", "").partition(":")
if FULL_DISK_RANK == os.environ.get("RANK"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(FULL_DISK_BYTES or 1 << 20),) * 2)
step_module.TrainStep.__call__ = call
step_module.edm_loss = loss
train = REPO / "launch" / "train.py"
sys.argv[0] = str(train)
runpy.run_path(str(train), run_name="__main__")
