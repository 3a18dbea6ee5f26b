"""Train FFF-VDI: a thin entry point over fff_vdi.train.Trainer.

    torchrun --nnodes N --nproc-per-node G launch/train.py experiment=paper_512x256 \
        experiment.data.shards=/data/ytvos-shards [more Hydra overrides]

A plain `python launch/train.py ...` runs as one process. See README.md and launch/*.sbatch.
Arguments are Hydra overrides of configs/ (composed with Hydra's compose API, strict for every key).
Exit status: 0 done (or saved on preemption), 2 a configuration or input error found before training
(one line naming the key; torchrun shows it as the root cause), 1 an error during training.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fff_vdi.train.preemption import PreemptionFlag  # noqa: E402 (standard library only: imports in ms)

# Before the heavy imports and the setup: a SIGUSR1/SIGTERM arriving from here on is held until the
# first step boundary instead of killing this rank (and, through the collectives, the job).
PREEMPTION = PreemptionFlag().install()

from fff_vdi.config import compose_experiment  # noqa: E402
from fff_vdi.errors import FFFVDIError, write_launcher_error  # noqa: E402
from fff_vdi.train.preflight import check_inputs  # noqa: E402


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        experiment, resolved = compose_experiment(REPO / "configs", argv)
        check_inputs(experiment)
    except FFFVDIError as e:  # the same on every rank: printed once per node, given to torchrun by each
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        write_launcher_error(f"error: {e}")
        return 2
    from torch.distributed.elastic.multiprocessing.errors import record

    from fff_vdi.train.trainer import run_training

    # record: an unexpected exception's traceback becomes torchrun's root cause too.
    return record(run_training)(experiment, resolved_yaml=resolved, preemption=PREEMPTION)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
