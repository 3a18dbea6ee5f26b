"""Check a training configuration against the file system before anything heavy is imported or loaded.

`launch/train.py` runs this in every process right after composing the configuration: a missing
shard folder, weights that are not there or an output folder that cannot be written is one line
naming the key within a second or two, instead of an error after minutes of model loading (or
process-group setup) on every rank. Only what can be checked without importing torch is checked (but
for an explicit trainer.resume, whose checkpoint rules live with the checkpoints);
the loaders keep their own checks (corrupt files, layouts).
"""

from __future__ import annotations

from pathlib import Path

from fff_vdi.config import ExperimentConfig
from fff_vdi.data.shards import MANIFEST_NAME, load_manifest
from fff_vdi.errors import ConfigError, DataError, InputError
from fff_vdi.utils.atomic import check_can_create
from fff_vdi.utils.paths import is_hub_repo_id, looked_for_at


def check_inputs(cfg: ExperimentConfig) -> None:
    """Raise an FFFVDIError for the first input that cannot work: a ConfigError naming the key (the
    checkpoint's own error for an incomplete trainer.resume)."""
    check_output_dir(cfg.output_dir)
    check_shards(cfg.data.shards, cfg.data.split)
    check_model(cfg)
    if cfg.trainer.resume not in ("auto", "none"):  # a checkpoint folder, which must be complete
        from fff_vdi.train.checkpoint import resolve_resume  # imports torch: only for this case

        resolve_resume(Path(cfg.output_dir) / "checkpoints", cfg.trainer.resume)


def check_output_dir(output_dir: str) -> None:
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("experiment.output_dir", output_dir, f"{looked_for_at(path)} is a file: choose a folder")
    try:
        check_can_create(path / "config.yaml")  # the first file the run writes
    except InputError as e:
        raise ConfigError("experiment.output_dir", output_dir, str(e)) from None


def check_shards(shards: str, split: str) -> None:
    root = Path(shards).expanduser()
    if not root.is_dir():
        raise ConfigError("experiment.data.shards", shards,
                          f"no such folder: {looked_for_at(root)}; set it to a folder written by tools/shard_ytvos.py")
    try:
        splits = load_manifest(root)["splits"]
    except DataError as e:
        raise ConfigError("experiment.data.shards", shards, str(e)) from None
    if split not in splits:
        raise ConfigError("experiment.data.split", split,
                          f"{root / MANIFEST_NAME} has the splits {sorted(splits)}: use one of them")


def check_model(cfg: ExperimentConfig) -> None:
    m = cfg.model
    if m.random_init:  # networks from bundled configs, nothing to load
        return
    for key in ("pretrained", "unet"):  # a folder, or a Hugging Face repo id (checked when it is loaded)
        value = getattr(m, key)
        if value and not Path(value).expanduser().is_dir() and not is_hub_repo_id(value):
            raise ConfigError(f"experiment.model.{key}", value, f"no such folder: {looked_for_at(value)}; "
                              "give a pipeline folder or a Hugging Face repo id")
    for key in ("raft", "flow_completion"):  # local weight files (or folders holding them)
        value = getattr(m, key)
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"experiment.model.{key}", value,
                              f"no such file: {looked_for_at(value)}; README.md, 'Weights', says where to get it")
