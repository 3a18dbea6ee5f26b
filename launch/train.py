"""Train FFF-VDI: a thin entry point over fff_vdi.train.Trainer.

    torchrun --nnodes N --nproc-per-node G launch/train.py experiment=paper_512x256 \
        experiment.data.shards=/data/ytvos-shards [more Hydra overrides]

A plain `python launch/train.py ...` runs as one process. See README.md and launch/*.sbatch.
Arguments are Hydra overrides of configs/ (composed with Hydra's compose API, strict for every key).
Exit status: 0 done (or saved on preemption), 2 a configuration error (one line naming the key),
1 an error during training.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fff_vdi.train.preemption import PreemptionFlag  # noqa: E402 (standard library only: imports in ms)

# Before the heavy imports and the setup: a SIGUSR1/SIGTERM arriving from here on is held until the
# first step boundary instead of killing this rank (and, through the collectives, the job).
PREEMPTION = PreemptionFlag().install()

from fff_vdi.config import compose_experiment  # noqa: E402
from fff_vdi.errors import FFFVDIError  # noqa: E402


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        experiment, resolved = compose_experiment(REPO / "configs", argv)
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fff_vdi.train.trainer import run_training

    return run_training(experiment, resolved_yaml=resolved, preemption=PREEMPTION)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
