"""Export a trained UNet (noise refiner included) as a complete pipeline folder for inference.

At the end of training the trainer gathers the sharded UNet into one state dict and rank 0 writes
`<run_dir>/pipeline/` (diffusers layout for the UNet, VAE, CLIP, scheduler; RAFT and flow completion
in their original layouts). From any checkpoint, without GPUs or a process group:

    python -m fff_vdi.train.export --run RUN_DIR [--checkpoint step-00001000] [--ema] --out PIPELINE_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fff_vdi.errors import FFFVDIError
from fff_vdi.models.components import PIPELINE_WRITER, Components, save_pipeline
from fff_vdi.models.unet import FFFVDIUNet
from fff_vdi.utils.atomic import check_output_folder

log = logging.getLogger(__name__)


def _template(components: Components, unet_config: dict) -> Components:
    """The components with a meta-device UNet: save_pipeline needs only its config, keys and shapes."""
    with torch.device("meta"):
        unet = FFFVDIUNet.from_config(unet_config)
    return dataclasses.replace(components, unet=unet)


def export_pipeline(unet, components: Components, unet_config: dict, out_dir: Path, is_main: bool,
                    frozen: dict[str, torch.Tensor] | None = None) -> None:
    """Collective: every rank takes part in gathering the shards; rank 0 writes `out_dir` (a run's own
    `pipeline/`, replaced when an earlier export wrote it). `frozen` (rank 0): the frozen parameters
    as loaded, written instead of the training copies (which training may hold in the compute dtype)."""
    full = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        if frozen:
            unknown = sorted(set(frozen) - set(full))
            if unknown:
                raise FFFVDIError(f"export: frozen parameters {unknown[:3]} are not in the UNet's state dict")
            full.update(frozen)
        save_pipeline(_template(components, unet_config), out_dir, unet_state_dict={k: v.float() for k, v in full.items()},
                      overwrite=True)
        log.info("exported the pipeline to %s", out_dir)


def export_from_checkpoint(run_dir: Path, checkpoint: str | None, out_dir: Path, use_ema: bool,
                           overwrite: bool = False) -> Path:
    """Load the run's base networks (from its config.yaml), apply a checkpoint's trained tensors,
    write a pipeline folder. Runs in one process on the CPU. `out_dir` as in save_pipeline, checked
    before anything is loaded."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fff_vdi.config import ExperimentConfig
    from fff_vdi.train.checkpoint import list_checkpoints, resolve_resume
    from fff_vdi.train.optim import updated_parameter_names
    from fff_vdi.train.trainer import build_components

    check_output_folder(out_dir, PIPELINE_WRITER, overwrite)
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
    components = build_components(cfg, seed=cfg.trainer.seed)
    unet = components.unet
    state = dict(unet.state_dict())
    trained = set(updated_parameter_names(unet, cfg.trainer.trainable, cfg.parallel.fast_paths))
    if use_ema:
        ema = {k: torch.empty_like(v, dtype=torch.float32) for k, v in state.items() if k in trained}
        dcp.load({"ema": ema}, checkpoint_id=str(path))
        state.update(ema)
    else:
        # Checkpoints hold the trained parameters only (all of them with trainer.trainable=all).
        wrapped = {"app": {"model": {k: v for k, v in state.items() if k in trained}}}
        dcp.load(wrapped, checkpoint_id=str(path))
        state.update(wrapped["app"]["model"])
    save_pipeline(_template(components, dict(unet.config)), out_dir, unet_state_dict={k: v.float() for k, v in state.items()},
                  overwrite=overwrite)
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
    try:
        path = export_from_checkpoint(args.run, args.checkpoint, args.out, args.ema, args.overwrite)
    except FFFVDIError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"export: while writing {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"exported {path} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
