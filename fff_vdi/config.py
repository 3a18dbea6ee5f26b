"""Typed configuration for every entry point.

The dataclasses below are the schema: Hydra composes the YAML files in `configs/` on top of them
(strict: an unknown key is an error naming the key), and `validate()` checks values with errors that
name the key, the value and the fix. Library code takes these dataclasses, never raw dicts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from fff_vdi.errors import ConfigError, FFFVDIError

SVD_XT_ID = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"


@dataclass
class ModelConfig:
    # A pipeline directory (the layout of tools/make_tiny_pipeline.py or an exported run) or a
    # Hugging Face id such as SVD-XT-1.1. It provides unet/, vae/, image_encoder/, feature_extractor/,
    # scheduler/ and, for our own layout, raft/ and flow_completion/.
    pretrained: Optional[str] = SVD_XT_ID
    revision: Optional[str] = None
    # Optional overrides: an FFF-VDI `unet/` folder, RAFT weights (raft-things.pth or torchvision's
    # file), ProPainter's recurrent_flow_completion.pth.
    unet: Optional[str] = None
    raft: Optional[str] = None
    flow_completion: Optional[str] = None
    # Build every network from bundled configs with random weights ("svd_xt" or a pipeline folder
    # whose configs to use); for benchmarks and tests, no download.
    random_init: Optional[str] = None
    raft_iters: int = 20
    # < 1 (not the published recipe): RAFT and flow completion on frames resized by this factor, the
    # flows resized back and rescaled to full-resolution pixels (cost falls with its square; at 0.5
    # RAFT estimates flow on a 1/16 grid, coarser than the 1/8 latents).
    flow_scale: float = 1.0
    # The CLIP/VAE/RAFT/flow-completion networks run frozen in this dtype ("bfloat16", "float32", "float16").
    frozen_dtype: str = "bfloat16"


@dataclass
class RectangleMaskConfig:
    """The paper's moving rectangles (docs/FFF-VDI.md, 'Training masks')."""

    min_size: float = 0.2  # of H and W
    max_size: float = 0.8
    size_oscillation: float = 0.1  # +/- relative size change over the clip
    min_speed: float = 1.0  # px per frame at the clip's resolution
    max_speed: float = 3.0
    speed_sd: float = 1.5
    angle_sd: float = 0.25


@dataclass
class FreeformMaskConfig:
    """E2FGVI/ProPainter-style free-form masks: blobs and brush strokes, still or moving."""

    min_blobs: int = 1
    max_blobs: int = 3
    blob_min_size: float = 0.15  # radius, fraction of min(H, W)
    blob_max_size: float = 0.45
    min_strokes: int = 0
    max_strokes: int = 3
    stroke_min_width: float = 0.03  # fraction of min(H, W)
    stroke_max_width: float = 0.10
    stroke_vertices: int = 6
    moving_prob: float = 0.5
    max_speed: float = 3.0


@dataclass
class MaskConfig:
    # Mixture weights of the mask kinds (normalised); the published recipe uses rectangles only.
    rectangles: float = 1.0
    freeform: float = 0.0
    objects: float = 0.0  # needs shards written with --with-annotations
    dilation: int = 0  # px, applied to every mask kind
    rect: RectangleMaskConfig = field(default_factory=RectangleMaskConfig)
    free: FreeformMaskConfig = field(default_factory=FreeformMaskConfig)


@dataclass
class ColorJitterConfig:
    enabled: bool = False
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02


@dataclass
class DataConfig:
    shards: str = "???"  # folder holding manifest.json from tools/shard_ytvos.py
    split: str = "train"
    backend: str = "auto"  # "dali" (GPU decode), "cpu" (PIL), "auto" = dali on CUDA else cpu
    num_frames: int = 25
    height: int = 256
    width: int = 512
    batch_size: int = 1  # clips per rank per micro-step
    frame_steps: list[int] = field(default_factory=lambda: [1, 2])
    # Videos shorter than the window: "skip", "smaller_step" (largest step that fits, else skip),
    # "reflect_pad" (play back and forth until T frames).
    short_video_policy: str = "smaller_step"
    # "random": an aspect-preserving random resized crop covering crop_scale of the largest such box;
    # "none": the whole frame resized to height x width (the published loader; the aspect ratio may change).
    crop: str = "random"
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # area of the largest crop
    hflip_prob: float = 0.5
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    # Defaults: the fastest DALI settings measured within 4 CPU cores per H100 (bench/results/data_h100.json).
    num_workers: int = 3  # reader processes (DALI external source or DataLoader workers)
    prefetch: int = 3
    decoder_threads: int = 2  # DALI CPU threads (host side of nvJPEG)
    hw_decoder_load: float = 1.0  # share of JPEGs sent to the A100/H100 hardware decoder (ignored elsewhere)
    seed: int = 123
    verify_crc: bool = True
    # A folder from tools/precompute_conditioning.py: the clips' RAFT flows, clean VAE latent
    # distributions and CLIP embeddings are read from it instead of computed at every step. It serves
    # only what it can serve exactly: crop=none, hflip_prob=0, no colour jitter, and the resolution,
    # frame steps, frozen networks and image shards it was made with (checked at start-up).
    conditioning: Optional[str] = None
    # Approximations of the online conditioning the cache may make, each asked for by name (measured
    # errors in the README): "flows_float16" (flows stored in float16: half the disk), "flows_eighth"
    # (flows stored on the latent grid and resized back for flow completion: 1/40 of the disk).
    conditioning_approximate: list[str] = field(default_factory=list)


@dataclass
class ObjectiveConfig:
    """The published training objective (docs/FFF-VDI.md, 'One training step')."""

    p_mean: float = 0.7
    p_std: float = 1.6
    cond_p_mean: float = -3.0
    cond_p_std: float = 0.5
    cond_dropout: float = 0.1
    fps: int = 7
    motion_bucket_id: int = 127


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    fused: bool = True  # fused AdamW on CUDA (ignored on the CPU)
    schedule: str = "constant"  # "constant" or "cosine", after warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the published recipe)
    ema_decay: float = 0.0  # 0 = no EMA


@dataclass
class ParallelConfig:
    # Recomputed in backward: "off", "full" (every resnet, attention and resampler of the UNet, and
    # the refiner), "selective" (every n-th of those).
    activation_checkpointing: str = "off"
    selective_every: int = 2  # with "selective": checkpoint every n-th unit
    compile: bool = False  # torch.compile of the UNet, per unit or per block (compile_scope)
    # "unit": every resnet, attention and resampler and the refiner's step on its own; units of one class
    # and shape share one compiled graph (regional compilation: fewer graphs to build). "block": each
    # top-level block (down, mid, up) as one graph.
    compile_scope: str = "unit"
    # With compile: torch.compile's artifacts saved beside the checkpoints (<output_dir>/compile/) and
    # hot-loaded at a restart, so a requeued job on any node skips inductor (train/compile_artifacts.py).
    compile_artifacts: bool = True
    compile_frozen: bool = False  # also compile the frozen networks' heavy parts (VAE encoder, RAFT, flow completion)
    force_channels_last: bool = True  # with compile: inductor's channels-last layout for every conv graph
    fast_paths: bool = True  # exact rewrites of UNet hot paths (fff_vdi/models/fast_paths.py)
    # False: one process, the UNet cast to mixed_precision whole (debugging, the published recipe).
    fsdp: bool = True
    reshard_after_forward: bool = True  # False: no second all-gather in backward, the gathered trained parameters held
    # False: the UNet's frozen parameters (trainable=temporal: 1,127M of 1,545M at SVD-XT size) stay
    # out of FSDP, replicated on every rank in mixed_precision: nothing to all-gather for them at each
    # step (2.3 GB in bf16 at SVD-XT size). They then take 2.3 GB per GPU instead of 4.5 GB / GPUs
    # (fp32 shards). True: sharded like the trained ones.
    shard_frozen: bool = False
    hsdp_replicas: int = 1  # >1: HSDP, replicate across this many groups (nodes), shard within
    mixed_precision: str = "bfloat16"  # param dtype of the trained UNet in forward/backward
    # "float16": the published recipe's mixed precision, the UNet's forward under torch.autocast(float16)
    # and the loss scaled by a GradScaler (with mixed_precision=float32, fsdp=false; CUDA only: off on the CPU).
    autocast: str = "off"
    tf32: bool = True  # TF32 in float32 matmuls (refiner, RAFT correlation); false: torch's default (off)
    cudnn_benchmark: bool = True  # cuDNN picks convolution algorithms by timing them (off in deterministic mode)
    nccl_timeout_s: int = 600


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    grad_accum: int = 1
    trainable: str = "temporal"  # "temporal" (temporal transformer blocks + refiner) or "all"
    seed: int = 123
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    async_checkpoint: bool = False
    resume: str = "auto"  # "auto" (newest complete), "none", or a checkpoint folder
    validate_every: int = 1000  # 0 = off
    validate_at_start: bool = False  # also validate before the first step (step 0: the untrained or loaded model)
    # E_warp's flow on the ground truth in validation: "raft" (the pipeline's; the evaluation protocol) or
    # "dis" (OpenCV's DIS, for a pipeline whose RAFT has random weights).
    val_ewarp_flow: str = "raft"
    val_clips: int = 2
    val_steps: int = 25  # sampler steps for validation videos
    nonfinite: str = "stop"  # "stop" or "skip" (skip the update, stop after max_nonfinite_skips)
    max_nonfinite_skips: int = 10
    heartbeat_s: float = 60.0
    gc_every: int = 50  # Python's garbage collector: generation 1 every n steps on every rank (0 = automatic)
    export_at_end: bool = True
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    name: str = "default"
    output_dir: str = "runs/${experiment.name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class RootConfig:
    """What Hydra composes for launch/train.py (`experiment` is the experiment group's package)."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)


# `${repo:quickstart_out/shards}` in configs/: a path inside this checkout, whatever the current folder.
REPO_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (configs/config.yaml extends `fff_vdi_schema`)
    and the `repo` resolver with OmegaConf."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="fff_vdi_schema", node=RootConfig)
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda path: str(REPO_ROOT / path))


# ---------------------------------------------------------------------------------------------
# composition


def compose_experiment(config_dir: str | Path, overrides: list[str]) -> tuple[ExperimentConfig, str]:
    """Compose `config_dir`/config.yaml with command-line overrides (Hydra's grammar) into a validated
    ExperimentConfig and its resolved YAML. Strict for every key, also for those added with `+` or
    `++` (Hydra lets those through its struct mode): any composition problem is one ConfigError or
    FFFVDIError line naming the key, instead of Hydra's multi-line report and its `+key` hint."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    values = dict(_split_override(o) for o in overrides)
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as e:
        raise _composition_error(e, values) from None
    _reject_unknown_keys(cfg, RootConfig(), "", values)
    try:
        resolved = OmegaConf.to_yaml(cfg.experiment, resolve=True)
        experiment: ExperimentConfig = OmegaConf.to_object(cfg.experiment)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, values) from None
    return validate(experiment), resolved


FROM_CONFIGS = "<set in configs/>"  # the value shown for a key that no override set


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a schema dataclass instance, nodes and leaves."""
    keys = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if is_dataclass(getattr(node, f.name)):
            keys += _schema_keys(getattr(node, f.name), key + ".")
    return keys


def _unknown_key_error(key: str, schema_node: Any, parent: str, value: Any) -> ConfigError:
    """ConfigError for a key the schema lacks: the closest valid keys, else the keys beside it."""
    same_depth = [k for k in _schema_keys(RootConfig()) if k.count(".") == key.count(".")]
    close = difflib.get_close_matches(key, same_depth, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    else:
        hint = f"the keys of {parent or 'the root'} are {', '.join(f.name for f in fields(schema_node))}"
    return ConfigError(key, value, f"no such key in the schema (fff_vdi/config.py): {hint}")


def _reject_unknown_keys(cfg, schema_node: Any, prefix: str, values: dict[str, str]) -> None:
    """Raise for the first key of the composed `cfg` that the schema dataclass lacks (added with `+`)."""
    names = {f.name for f in fields(schema_node)}
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key_error(full, schema_node, prefix.rstrip("."), values.get(full, cfg[key]))
        child = getattr(schema_node, key)
        if is_dataclass(child):
            _reject_unknown_keys(cfg[key], child, full + ".", values)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _omegaconf_error(error, values: dict[str, str]) -> FFFVDIError:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = getattr(error, "full_key", None)
    if not key:
        return FFFVDIError(f"configuration: {_first_line(str(error))}")
    if isinstance(error, (ConfigAttributeError, ConfigKeyError)):
        parent = key.rpartition(".")[0]
        node: Any = RootConfig()
        for part in parent.split(".") if parent else ():
            node = getattr(node, part, None)
        if is_dataclass(node):
            return _unknown_key_error(key, node, parent, values.get(key, FROM_CONFIGS))
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(key, "???", f"it has no default: set it, e.g. on the command line ({key}=...)")
    return ConfigError(key, values.get(key, FROM_CONFIGS), _first_line(getattr(error, "msg", str(error))))


def _composition_error(error, values: dict[str, str]) -> FFFVDIError:
    from omegaconf.errors import OmegaConfBaseException

    cause = error.__cause__ or error.__context__  # an override's problem, or a YAML file's
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf_error(cause, values)
    # Hydra's own problems (an unknown experiment=NAME, override syntax): its message on one line,
    # with the options it lists, without the config search path.
    sentences, options = [], []
    for line in str(error).split("Config search path")[0].splitlines():
        if line.startswith("\t"):
            options.append(line.strip())
        elif line.strip():
            sentences.append(line.strip().rstrip("."))
    override = getattr(error, "override", None)
    where = f"override '{override}': " if override else ""
    return FFFVDIError(f"configuration: {where}{'; '.join(sentences)}{' ' + ', '.join(options) if options else ''}")


# ---------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(key, value, fix)


def _choice(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, value, f"use one of {', '.join(map(repr, choices))}")


def validate_data(d: DataConfig, prefix: str = "data") -> None:
    _check(d.shards not in ("", "???"), f"{prefix}.shards", d.shards,
           "set it to the folder written by tools/shard_ytvos.py (it holds manifest.json)")
    _choice(f"{prefix}.backend", d.backend, ("auto", "dali", "cpu"))
    _check(d.num_frames >= 2, f"{prefix}.num_frames", d.num_frames, "use at least 2 frames")
    for k in ("height", "width"):
        v = getattr(d, k)
        _check(v >= 64 and v % 8 == 0, f"{prefix}.{k}", v, "use a multiple of 8, at least 64")
    _check(d.batch_size >= 1, f"{prefix}.batch_size", d.batch_size, "use 1 or more")
    _check(len(d.frame_steps) > 0 and all(int(s) >= 1 for s in d.frame_steps),
           f"{prefix}.frame_steps", list(d.frame_steps), "give a non-empty list of steps >= 1, e.g. [1, 2]")
    _choice(f"{prefix}.short_video_policy", d.short_video_policy, ("skip", "smaller_step", "reflect_pad"))
    _choice(f"{prefix}.crop", d.crop, ("random", "none"))
    cs = list(d.crop_scale)
    _check(len(cs) == 2 and 0 < cs[0] <= cs[1] <= 1, f"{prefix}.crop_scale", cs,
           "give [min, max] with 0 < min <= max <= 1 (area of the largest aspect-preserving crop)")
    _check(0 <= d.hflip_prob <= 1, f"{prefix}.hflip_prob", d.hflip_prob, "use a probability in [0, 1]")
    m = d.masks
    w = (m.rectangles, m.freeform, m.objects)
    _check(all(x >= 0 for x in w) and sum(w) > 0, f"{prefix}.masks", dict(rectangles=w[0], freeform=w[1], objects=w[2]),
           "mixture weights must be >= 0 with a positive sum")
    _check(m.dilation >= 0, f"{prefix}.masks.dilation", m.dilation, "use 0 or more pixels")
    r = m.rect
    _check(0 < r.min_size <= r.max_size <= 1, f"{prefix}.masks.rect.min_size/max_size", (r.min_size, r.max_size),
           "use 0 < min_size <= max_size <= 1")
    _check(d.num_workers >= 0, f"{prefix}.num_workers", d.num_workers, "use 0 or more")
    unknown = sorted(set(d.conditioning_approximate) - set(CONDITIONING_APPROXIMATIONS))
    _check(not unknown, f"{prefix}.conditioning_approximate", list(d.conditioning_approximate),
           f"use a list of {', '.join(CONDITIONING_APPROXIMATIONS)} (or [] for none)")
    if d.conditioning is not None:
        validate_cacheable(d, prefix)


CONDITIONING_APPROXIMATIONS = ("flows_float16", "flows_eighth")


def validate_cacheable(d: DataConfig, prefix: str = "data") -> None:
    """A precomputed conditioning cache holds each frame as it is without augmentation: refuse what
    would change the frames (it would silently pair cached flows and latents with other pixels)."""
    fix = f"the conditioning cache ({prefix}.conditioning) holds whole, unflipped, unjittered frames"
    _check(d.crop == "none", f"{prefix}.crop", d.crop, f"use 'none' (the whole frame, as published): {fix}")
    _check(d.hflip_prob == 0, f"{prefix}.hflip_prob", d.hflip_prob, f"use 0: {fix}")
    _check(not d.color_jitter.enabled, f"{prefix}.color_jitter.enabled", d.color_jitter.enabled, f"use false: {fix}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every value that the code relies on; raise ConfigError naming the key."""
    validate_data(cfg.data, "experiment.data")
    m = cfg.model
    _check(m.raft_iters >= 1, "experiment.model.raft_iters", m.raft_iters, "use 1 or more RAFT iterations")
    _choice("experiment.model.frozen_dtype", m.frozen_dtype, ("bfloat16", "float32", "float16"))
    _check(0 < m.flow_scale <= 1, "experiment.model.flow_scale", m.flow_scale, "use a factor in (0, 1] (1: full resolution)")
    o = cfg.optim
    _check(o.lr > 0, "experiment.optim.lr", o.lr, "use a positive learning rate")
    _choice("experiment.optim.schedule", o.schedule, ("constant", "cosine"))
    _check(o.warmup_steps >= 0, "experiment.optim.warmup_steps", o.warmup_steps, "use 0 or more")
    _check(o.grad_clip >= 0, "experiment.optim.grad_clip", o.grad_clip, "use 0 (off) or a positive norm")
    _check(0 <= o.ema_decay < 1, "experiment.optim.ema_decay", o.ema_decay, "use 0 (off) or a decay in (0, 1)")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "experiment.optim.betas", list(o.betas),
           "give two values in [0, 1)")
    p = cfg.parallel
    _choice("experiment.parallel.activation_checkpointing", p.activation_checkpointing, ("off", "full", "selective"))
    _choice("experiment.parallel.compile_scope", p.compile_scope, ("unit", "block"))
    _check(p.selective_every >= 1, "experiment.parallel.selective_every", p.selective_every, "use 1 or more")
    _choice("experiment.parallel.mixed_precision", p.mixed_precision, ("bfloat16", "float32"))
    _choice("experiment.parallel.autocast", p.autocast, ("off", "float16"))
    _check(p.autocast == "off" or (p.mixed_precision == "float32" and not p.fsdp), "experiment.parallel.autocast",
           p.autocast, "autocast runs over float32 parameters in one process: set experiment.parallel.mixed_precision="
           "float32 and experiment.parallel.fsdp=false, or autocast=off")
    _check(p.hsdp_replicas >= 1, "experiment.parallel.hsdp_replicas", p.hsdp_replicas, "use 1 (plain FSDP) or more")
    t = cfg.trainer
    _check(t.max_steps >= 1, "experiment.trainer.max_steps", t.max_steps, "use 1 or more")
    _check(t.grad_accum >= 1, "experiment.trainer.grad_accum", t.grad_accum, "use 1 or more")
    _choice("experiment.trainer.trainable", t.trainable, ("temporal", "all"))
    _check(t.keep_checkpoints >= 2, "experiment.trainer.keep_checkpoints", t.keep_checkpoints,
           "keep at least 2, so that a crash while saving never leaves you without a checkpoint")
    _check(t.checkpoint_every >= 1, "experiment.trainer.checkpoint_every", t.checkpoint_every, "use 1 or more")
    _choice("experiment.trainer.nonfinite", t.nonfinite, ("stop", "skip"))
    _choice("experiment.trainer.val_ewarp_flow", t.val_ewarp_flow, ("raft", "dis"))
    _check(not t.validate_at_start or t.validate_every > 0, "experiment.trainer.validate_at_start", t.validate_at_start,
           "validation is off (experiment.trainer.validate_every=0): set validate_every too, or validate_at_start=false")
    _check(t.gc_every >= 0, "experiment.trainer.gc_every", t.gc_every,
           "use 0 (Python's automatic collection) or a number of steps, e.g. 50")
    _check(t.validate_every == 0 or m.frozen_dtype == p.mixed_precision, "experiment.model.frozen_dtype",
           m.frozen_dtype, f"validation samples with the frozen networks in the UNet's dtype: set it to "
           f"experiment.parallel.mixed_precision ({p.mixed_precision!r}) or turn validation off "
           "(experiment.trainer.validate_every=0)")
    return cfg
