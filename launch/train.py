"""Train FFF-VDI: a thin entry point over fff_vdi.train.Trainer.

    torchrun --nnodes N --nproc-per-node G launch/train.py experiment=paper_512x256 \
        experiment.data.shards=/data/ytvos-shards [more Hydra overrides]

A plain `python launch/train.py ...` runs as one process. See README.md and launch/*.sbatch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fff_vdi.train.preemption import PreemptionFlag  # noqa: E402 (standard library only: imports in ms)

# Before the heavy imports and the setup: a SIGUSR1/SIGTERM arriving from here on is held until the
# first step boundary instead of killing this rank (and, through the collectives, the job).
PREEMPTION = PreemptionFlag().install()

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fff_vdi.config import ExperimentConfig, register_configs  # noqa: E402

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from fff_vdi.train.trainer import run_training

    experiment: ExperimentConfig = OmegaConf.to_object(cfg.experiment)
    resolved = OmegaConf.to_yaml(cfg.experiment, resolve=True)
    code = run_training(experiment, resolved_yaml=resolved, preemption=PREEMPTION)
    if code:
        sys.exit(code)  # hydra.main drops return values: exit here so torchrun and Slurm see failures


if __name__ == "__main__":
    main()
