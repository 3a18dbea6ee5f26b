"""The one parallelisation step for the trained UNet, in torchtitan's order:

  1. activation checkpointing (off, full, or selective: every n-th unit) of fine-grained units, each
     resnet, attention and resampler inside the blocks and the refiner: recomputing a whole top-level
     block would hold that block's activations at once (over 100 GiB at 1024x576x25),
  2. torch.compile per unit (regional: repeated units share a graph) or per block, in place, so
     parameter names do not change,
  3. FSDP2 `fully_shard` per block, then at the root, with bf16 parameters and fp32 gradient
     reduction; HSDP (replicate across groups, shard within) when `hsdp_replicas` > 1. Frozen
     parameters stay out of FSDP unless `shard_frozen`: cast to the compute dtype in place and
     replicated, they need no all-gather. Nothing reads them back at their loaded precision: the
     export (train/export.py) takes every frozen tensor from the base weights again.

"Blocks" are the UNet's top-level stages: the noise refiner, each down block, the mid block and each
up block. The model code knows nothing of this; frozen networks (VAE, CLIP, RAFT, flow completion)
stay outside the FSDP tree.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from fff_vdi.config import ParallelConfig

log = logging.getLogger(__name__)


def unet_blocks(unet: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute-or-index) of every block, in forward order."""
    blocks: list[tuple[nn.Module, str]] = [(unet, "noise_refiner")]
    blocks += [(unet.down_blocks, str(i)) for i in range(len(unet.down_blocks))]
    blocks.append((unet, "mid_block"))
    blocks += [(unet.up_blocks, str(i)) for i in range(len(unet.up_blocks))]
    return blocks


def _get(parent: nn.Module, name: str) -> nn.Module:
    return parent[int(name)] if isinstance(parent, nn.ModuleList) else getattr(parent, name)


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def checkpoint_units(unet: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute-or-index) of every activation-checkpointing unit, in forward order: the
    refiner, then each block's resnets, attentions and down/upsamplers."""
    units: list[tuple[nn.Module, str]] = [(unet, "noise_refiner")]
    for parent, name in unet_blocks(unet)[1:]:
        block = _get(parent, name)
        for group in ("resnets", "attentions", "downsamplers", "upsamplers"):
            modules = getattr(block, group, None)
            if isinstance(modules, nn.ModuleList):
                units += [(modules, str(i)) for i in range(len(modules))]
    return units


def apply_activation_checkpointing(unet: nn.Module, mode: str, every: int = 2) -> int:
    """Wrap units so their activations are recomputed in backward. Returns the number wrapped."""
    if mode == "off":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = 0
    for i, (parent, name) in enumerate(checkpoint_units(unet)):
        if mode == "selective" and i % every != 0:
            continue
        _set(parent, name, checkpoint_wrapper(_get(parent, name), preserve_rng_state=False))
        wrapped += 1
    return wrapped


def state_dict_name(parameter_name: str) -> str:
    """A parameter's name as state dicts and checkpoints spell it: without the activation-checkpointing
    wrappers' component (`named_parameters()` of the wrapped UNet includes it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    return parameter_name.replace(_CHECKPOINT_PREFIX, "")


def compile_units(unet: nn.Module, scope: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute-or-index) of every module `apply_compile` compiles on its own: the
    activation-checkpointing units (scope "unit") or the top-level blocks ("block")."""
    if scope not in ("unit", "block"):
        raise ValueError(f"compile scope must be 'unit' or 'block', got {scope!r}")
    return checkpoint_units(unet) if scope == "unit" else unet_blocks(unet)


def apply_compile(unet: nn.Module, scope: str = "unit", **compile_kwargs) -> None:
    """torch.compile every unit or block (`compile_units`) in place, with static shapes (`dynamic=False`).

    Scope "unit" is regional compilation: dynamo keys its cache by a forward's code and guards on
    shapes, not on the module, so units of one class at one size (the transformers and resnets that
    repeat within a level of the UNet) share one compiled graph, and inductor builds each distinct
    unit once. The glue between units (concatenated skips, the time embedding) runs eagerly.
    Scope "block" compiles each top-level block whole (more fusion across units, a graph per block).

    Units of one class run at several sizes (three CrossAttnDownBlockSpatioTemporal at h, h/2, h/4):
    by default dynamo would recompile the second with dynamic shapes, whose kernels are slower. With
    static shapes each size gets its own specialised graph, so the per-code recompile limit is raised
    to the number of compiled modules (a global dynamo setting; never lowered). A module with a
    recurrence over frames (the noise refiner) compiles its step rather than the unrolled loop
    (`compile_recurrence`). `compile_kwargs` go to torch.compile (e.g. fullgraph=True)."""
    import torch._dynamo.config as dynamo_config

    kwargs = {"dynamic": False, **compile_kwargs}
    units = compile_units(unet, scope)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(units))
    for parent, name in units:
        module = _get(parent, name)
        if hasattr(module, "compile_recurrence"):
            module.compile_recurrence(**kwargs)
        else:
            module.compile(**kwargs)


def build_mesh(world_size: int, device_type: str, hsdp_replicas: int):
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp_replicas > 1:
        if world_size % hsdp_replicas:
            from fff_vdi.errors import ConfigError

            raise ConfigError("experiment.parallel.hsdp_replicas", hsdp_replicas,
                              f"must divide the number of processes ({world_size})")
        return init_device_mesh(device_type, (hsdp_replicas, world_size // hsdp_replicas),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


@torch.compiler.disable  # runs on the compiled block's outputs, like FSDP's own hooks
def _copy_view_outputs(module: nn.Module, args, output):
    """A forward hook run before FSDP2's: outputs that are views of another tensor, copied.

    FSDP2 hangs its pre-backward hook (the all-gather of the unit's parameters for its backward) on
    every output tensor of a unit, and an in-place op on a view output would silently drop it, so it
    warned on every step ("returned a view tensor ... can cause backward to fail or produce wrong
    gradients"). Three units return views: the root (its output unflattened to (B, T, ...)), the
    last down block and the mid block (SpatioTemporalResBlock ends by permuting its (B, C, T, h, w)
    result back to (B*T, C, h, w), which is a view: the elementwise mix before it keeps its inputs'
    (B*T, C, h, w) memory layout). No consumer of theirs works in place, so the gradients were
    right; copying them (the smallest feature maps and the output: about 3 MB per clip at SVD-XT
    size and 512x256 in bf16) makes it so for good, and the warning goes."""
    copies: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        if t._base is None or not t.requires_grad:
            return t
        return copies.setdefault(id(t), t.clone())  # the same tensor twice (a block's output and skip): one copy

    return tree_map_only(torch.Tensor, own, output)


def apply_fsdp(unet: nn.Module, mesh, param_dtype: torch.dtype, reshard_after_forward: bool,
               shard_frozen: bool) -> int:
    """Shard per block and at the root. With `shard_frozen` False the parameters that do not train
    are cast to `param_dtype` in place and left out of FSDP (replicated; FSDP2's `ignored_params`).
    Every unit's view outputs are copied first (`_copy_view_outputs`).
    Returns the number of parameter elements left out."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Inputs are not cast: sigma, timesteps and time ids must stay float32; the model casts what
    # meets its weights to the weights' dtype itself.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    frozen = set() if shard_frozen else {p for p in unet.parameters() if not p.requires_grad}
    for p in frozen:  # in place: the Parameter objects (and so the compiled blocks' inputs) stay
        p.data = p.data.to(param_dtype)
    blocks = unet_blocks(unet)
    for i, (parent, name) in enumerate(blocks):
        block = _get(parent, name)
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
                    ignored_params={p for p in block.parameters() if p in frozen} or None)
        block.register_forward_hook(_copy_view_outputs, prepend=True)
    fully_shard(unet, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=frozen or None)
    unet.register_forward_hook(_copy_view_outputs, prepend=True)
    return sum(p.numel() for p in frozen)


def parallelize_unet(unet: nn.Module, cfg: ParallelConfig, world_size: int, device: torch.device,
                     compile_kwargs: dict | None = None) -> nn.Module:
    """Apply checkpointing, compile and FSDP2 to `unet` in place (see module docstring).
    `compile_kwargs` go to torch.compile when cfg.compile is on (benchmarks: another backend)."""
    if not cfg.fsdp and world_size > 1:
        from fff_vdi.errors import ConfigError

        raise ConfigError("experiment.parallel.fsdp", cfg.fsdp,
                          f"without FSDP nothing would reduce the gradients of {world_size} processes: "
                          "use one process, or fsdp=true")
    n = apply_activation_checkpointing(unet, cfg.activation_checkpointing, cfg.selective_every)
    if cfg.compile:
        import torch._inductor.config as inductor_config

        # Inductor's heuristic keeps NCHW for graphs with a conv of many more input than output
        # channels, which covers every up block and the refiner (most of the conv FLOPs). A global
        # setting of inductor's: the frozen networks' graphs get it too.
        inductor_config.force_layout_optimization = cfg.force_channels_last
        apply_compile(unet, cfg.compile_scope, **(compile_kwargs or {}))
    param_dtype = torch.bfloat16 if cfg.mixed_precision == "bfloat16" else torch.float32
    use_fsdp = cfg.fsdp and torch.distributed.is_initialized()
    if not use_fsdp and param_dtype != torch.float32:
        unet.to(param_dtype)
    if use_fsdp:
        mesh = build_mesh(world_size, device.type, cfg.hsdp_replicas)
        replicated = apply_fsdp(unet, mesh, param_dtype, cfg.reshard_after_forward, cfg.shard_frozen)
    log.info("parallelize: activation checkpointing %s (%d units), compile %s, %s",
             cfg.activation_checkpointing, n, f"per {cfg.compile_scope}" if cfg.compile else "off",
             f"FSDP2 over {world_size} ranks (HSDP x{cfg.hsdp_replicas}), {replicated / 1e6:.1f}M frozen "
             "parameters replicated" if use_fsdp else "no FSDP (one process)")
    return unet
