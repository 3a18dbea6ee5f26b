"""Export a trained UNet (noise refiner included) as a complete pipeline folder for inference.

One path for the end of training and for any checkpoint: the run's base networks, built again as its
configuration builds them (so every frozen tensor is written exactly as loaded, whatever dtype training
held it in), with the checkpoint's trained tensors applied; then `save_pipeline` writes the folder
(diffusers layout for the UNet, VAE, CLIP, scheduler; RAFT and flow completion in their original
layouts). At the end of training rank 0 exports the final checkpoint to `<run_dir>/pipeline/`; from
any checkpoint, in one process, without GPUs or a process group:

    python -m fff_vdi.train.export --run RUN_DIR [--checkpoint step-00001000] [--ema] --out PIPELINE_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fff_vdi.config import ExperimentConfig
from fff_vdi.errors import FFFVDIError, run_command
from fff_vdi.utils.atomic import PIPELINE_WRITER, check_output_folder

if TYPE_CHECKING:
    import torch

# torch and the networks' libraries load in the functions, after the output folder is checked: a
# refused --out is answered in a second, not after the seconds their imports take.

log = logging.getLogger(__name__)


def export_pipeline(cfg: ExperimentConfig, checkpoint: Path, out_dir: Path, use_ema: bool = False,
                    overwrite: bool = False, device: torch.device | str | None = None) -> None:
    """Write `out_dir` from the base networks of `cfg` and the trained tensors of `checkpoint` (a
    complete checkpoint folder of a run with this configuration). `out_dir` as in save_pipeline,
    checked before anything is loaded. `device`: where random-weight runs (`model.random_init`) draw
    their base weights; the training run's kind of device draws its numbers (CPU and GPU differ)."""
    check_output_folder(out_dir, PIPELINE_WRITER, overwrite)
    import torch
    import torch.distributed.checkpoint as dcp

    from fff_vdi.models.components import build_components, save_pipeline
    from fff_vdi.train.optim import updated_parameter_names

    components = build_components(cfg.model, seed=cfg.trainer.seed, device=device)
    unet = components.unet
    state = dict(unet.state_dict())
    # Checkpoints hold the updated parameters only (all of them with trainer.trainable=all).
    trained = set(updated_parameter_names(unet, cfg.trainer.trainable, cfg.parallel.fast_paths))
    with warnings.catch_warnings():  # one process reads the full tensors: what no_dist says (and DCP warns of)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if use_ema:
            ema = {k: torch.empty_like(v, dtype=torch.float32) for k, v in state.items() if k in trained}
            dcp.load({"ema": ema}, checkpoint_id=str(checkpoint), no_dist=True)
            state.update(ema)
        else:
            wrapped = {"app": {"model": {k: v for k, v in state.items() if k in trained}}}
            dcp.load(wrapped, checkpoint_id=str(checkpoint), no_dist=True)
            state.update(wrapped["app"]["model"])
    save_pipeline(components, out_dir, unet_state_dict={k: v.float() for k, v in state.items()}, overwrite=overwrite)
    log.info("exported %s%s to %s", checkpoint, " (EMA)" if use_ema else "", out_dir)


def export_from_checkpoint(run_dir: Path, checkpoint: str | None, out_dir: Path, use_ema: bool,
                           overwrite: bool = False) -> Path:
    """`export_pipeline` for a run folder, on the CPU: its config.yaml and one of its checkpoints
    (default: the newest complete one). Returns the checkpoint's path. (A run with random weights
    drawn on GPUs gets CPU-drawn frozen weights here: random either way.)"""
    check_output_folder(out_dir, PIPELINE_WRITER, overwrite)
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fff_vdi.train.checkpoint import list_checkpoints, resolve_resume

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FFFVDIError(f"{config_file} is missing: --run must be a training run folder (it holds config.yaml and checkpoints/)")
    try:
        cfg: ExperimentConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                                                                     OmegaConf.load(config_file)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise FFFVDIError(f"{config_file} is not the config.yaml of a training run of this version ("
                          f"{str(e).splitlines()[0]}): --run must be a run folder written by launch/train.py") from None
    root = run_dir / "checkpoints"
    path = resolve_resume(root, str(root / checkpoint) if checkpoint else "auto")
    if path is None:
        raise FFFVDIError(f"{root} holds no complete checkpoint; available: {[p.name for _, p in list_checkpoints(root, False)]}")
    export_pipeline(cfg, path, out_dir, use_ema, overwrite)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="training run folder (config.yaml, checkpoints/)")
    ap.add_argument("--checkpoint", help="checkpoint folder name, e.g. step-00001000 (default: newest complete)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (needs optim.ema_decay > 0)")
    ap.add_argument("--out", required=True, type=Path, help="pipeline folder to write (absent or empty)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if an earlier export wrote it (anything else is never replaced)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exported = []
    code = run_command(lambda: exported.append(export_from_checkpoint(args.run, args.checkpoint, args.out, args.ema,
                                                                      args.overwrite)), writing=args.out, prog="export")
    if code == 0:
        print(f"exported {exported[0]} to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
