"""Optimizer, learning-rate schedule, gradient clipping and EMA for the (sharded) trained parameters."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fff_vdi.config import OptimConfig

# Parameter names the published recipe trains (docs/FFF-VDI.md): temporal transformer blocks + refiner.
TEMPORAL_PATTERNS = ("temporal_transformer_block", "noise_refiner")


def mark_trainable(unet: nn.Module, trainable: str) -> list[str]:
    """Set requires_grad by the `trainer.trainable` rule; returns the trained parameter names."""
    names = []
    for name, p in unet.named_parameters():
        p.requires_grad_(trainable == "all" or any(k in name for k in TEMPORAL_PATTERNS))
        if p.requires_grad:
            names.append(name)
    return names


def updated_parameter_names(unet: nn.Module, trainable: str, fast_paths: bool) -> list[str]:
    """The parameters the optimizer updates (and checkpoints hold): the `trainer.trainable` rule, minus
    those the fast paths disconnect from the output (frozen here). Trainer and export agree on it."""
    names = mark_trainable(unet, trainable)
    if fast_paths:
        from fff_vdi.models.fast_paths import disconnected_parameters

        unused = disconnected_parameters(dict(unet.config))
        for name, p in unet.named_parameters():
            if name in unused:
                p.requires_grad_(False)
        names = [n for n in names if n not in unused]
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Fused AdamW runs one kernel for all parameters on CUDA (DTensor shards included).
    fused = cfg.fused and device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad norm over all ranks' shards (DTensor-aware); clips when max_norm > 0.

    torch's clip_grad_norm_ reduces DTensor norms across the mesh; the result is a DTensor that we
    materialise, so every rank sees the same number."""
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


class EMA:
    """Exponential moving average of the trained parameters, kept in fp32 and sharded like them.

    The shadow tensors are DTensors when the parameters are, so each rank keeps only its shard and the
    update needs no communication."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])
