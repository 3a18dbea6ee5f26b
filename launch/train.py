"""Train FFF-VDI: a thin entry point over fff_vdi.train.Trainer.

    torchrun --nnodes N --nproc-per-node G launch/train.py experiment=paper_512x256 \
        experiment.data.shards=/data/ytvos-shards [more Hydra overrides]

A plain `python launch/train.py ...` runs as one process. See README.md and launch/*.sbatch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fff_vdi.config import ExperimentConfig, register_configs  # noqa: E402

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from fff_vdi.train.trainer import run_training

    experiment: ExperimentConfig = OmegaConf.to_object(cfg.experiment)
    code = run_training(experiment, resolved_yaml=OmegaConf.to_yaml(cfg.experiment, resolve=True))
    if code:
        sys.exit(code)  # hydra.main drops return values: exit here so torchrun and Slurm see failures


if __name__ == "__main__":
    main()
