"""One optimizer step: the one the trainer runs and bench/train_step.py times.

`build_train_step(cfg, dist, components)` builds what a step touches, in torchtitan's order: the
trainable set, the UNet fast paths, `parallelize_unet`, optimizer, LR schedule, EMA, loss scaler, the
frozen conditioner. `train_step(batches, step)` then runs one optimizer step: per micro-step a batch,
its conditioning (online, or the clean clip's features delivered with the batch: objective.py), the
EDM loss forward and backward; then the decisions every rank takes together, clipping, the update,
EMA and the LR schedule.

One host synchronisation per step: the global loss, the gradient norm and the ranks' stop requests
are read together after backward, because the non-finite policy must decide before the optimizer
changes anything. Nothing else here waits for the GPU, and the trainer's logging reads only what a
step returns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from fff_vdi.config import ExperimentConfig, ParallelConfig
from fff_vdi.distributed.env import DistInfo, all_reduce_mean, max_over_ranks
from fff_vdi.distributed.parallelize import parallelize_unet, state_dict_name
from fff_vdi.errors import FFFVDIError
from fff_vdi.models.components import Components
from fff_vdi.train.objective import DTYPES, FrozenConditioner, edm_loss, step_generator
from fff_vdi.train.optim import (
    EMA,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    mark_trainable,
    trainable_parameters,
    updated_parameter_names,
)
from fff_vdi.train.profiling import NO_PHASES, Phases

log = logging.getLogger(__name__)


class NonFiniteError(FFFVDIError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@contextlib.contextmanager
def backend_settings(parallel: ParallelConfig, deterministic: bool):
    """TF32 in float32 matmuls and cuDNN's autotuning as configured (deterministic mode: neither
    autotuning nor a change to torch's TF32 default); the previous values back on exit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        if not deterministic:
            torch.backends.cuda.matmul.allow_tf32 = parallel.tf32
        torch.backends.cudnn.benchmark = parallel.cudnn_benchmark and not deterministic
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


@dataclass
class StepOutput:
    loss: float  # mean over the micro-steps and the ranks (non-finite on a skipped step)
    grad_norm: float  # global, before clipping (infinite when the loss scaler found an overflow)
    lr: float  # the learning rate of this step
    updated: bool  # False: the update was skipped (non-finite policy, or the loss scaler's overflow)
    stop: int  # the strongest stop request of any rank (0: none; agreed by every rank)
    host_s: dict[str, float] = field(default_factory=dict)  # host seconds: data, conditioning, unet (launches on CUDA)


class TrainStep:
    """`train_step(batches, step)` runs optimizer step `step` (0-based) on the next `grad_accum`
    batches of `batches`. Its random draws come from (seed, rank, step, micro-step) alone."""

    def __init__(self, cfg: ExperimentConfig, dist: DistInfo, unet, conditioner: FrozenConditioner, optimizer,
                 scheduler, ema: EMA | None, scaler: torch.amp.GradScaler):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.unet, self.conditioner, self.optimizer, self.scheduler, self.ema = unet, conditioner, optimizer, scheduler, ema
        self.scaler = scaler
        self.params = trainable_parameters(unet)
        self.compute_dtype = DTYPES[cfg.parallel.mixed_precision]
        self.nonfinite_skips = 0  # update skips under trainer.nonfinite=skip (checkpointed)
        self.overflow_skips = 0  # updates the loss scaler skipped (float16 overflow)

    def __call__(self, batches: Iterator[dict], step: int, *, stop_requested: Callable[[], int] = lambda: 0,
                 phases: Phases = NO_PHASES) -> StepOutput:
        """`stop_requested()` (this rank's wish to stop: 0 none, larger = stronger, e.g. a preemption
        signal's code) is read after backward, when the ranks agree on the largest; `phases` times the step's parts (profiling.py)."""
        t = self.cfg.trainer
        host_s = {"data": 0.0, "conditioning": 0.0, "unet": 0.0}
        losses = []
        for micro in range(t.grad_accum):
            tick = time.perf_counter()
            batch = next(batches)
            host_s["data"] += time.perf_counter() - tick
            gen = step_generator(t.seed, self.dist.rank, step, micro, self.device)
            tick = time.perf_counter()
            cond = self.conditioner(batch, gen)
            host_s["conditioning"] += time.perf_counter() - tick
            tick = time.perf_counter()
            losses.append(self.forward_backward(cond, gen, micro == t.grad_accum - 1, phases))
            host_s["unet"] += time.perf_counter() - tick
        with phases("optimizer"):
            out = self.update(losses, step, stop_requested)
        out.host_s = host_s
        return out

    def forward_backward(self, cond, gen: torch.Generator, last_micro_step: bool, phases: Phases = NO_PHASES) -> torch.Tensor:
        """The EDM loss of one micro-step and its backward (scaled by the loss scaler when it is on);
        returns the loss, detached."""
        if hasattr(self.unet, "set_requires_gradient_sync"):  # FSDP2: reduce only after the last micro-step
            self.unet.set_requires_gradient_sync(last_micro_step)
        autocast = torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled())
        with phases("unet_forward"), autocast:
            loss = edm_loss(self.unet, cond, self.cfg.objective, gen, self.compute_dtype)
        with phases("backward"):
            self.scaler.scale(loss / self.cfg.trainer.grad_accum).backward()
        return loss.detach()

    def update(self, losses: list[torch.Tensor], step: int, stop_requested: Callable[[], int] = lambda: 0) -> StepOutput:
        """The decisions every rank takes together (from one read of the global loss, the gradient
        norm and the stop requests), clipping, the optimizer, EMA and the LR schedule."""
        loss = all_reduce_mean(torch.stack(losses).mean().float().view(1))
        stop = max_over_ranks(stop_requested(), self.device)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        loss_value, norm_value, stop_value = torch.cat([loss, grad_norm.float().view(1), stop]).tolist()
        overflow = not math.isfinite(norm_value)
        updated = False
        if not math.isfinite(loss_value) or (overflow and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # with loss scaling: a smaller scale, and the scaler ready for the next unscale_
            self._on_nonfinite(step, loss_value, norm_value)
        else:
            self.scaler.step(self.optimizer)  # with loss scaling: no update when the gradients overflowed
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            updated = not overflow
            self.overflow_skips += overflow
            if updated and self.ema is not None:
                self.ema.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return StepOutput(loss_value, norm_value, lr, updated, int(stop_value))

    def _on_nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        t = self.cfg.trainer
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} " \
               f"(loss {loss}, grad norm {grad_norm})"
        if t.nonfinite == "skip" and self.nonfinite_skips < t.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning("%s: update skipped (%d of %d allowed skips)", what, self.nonfinite_skips, t.max_nonfinite_skips)
            return
        raise NonFiniteError(f"{what}: stopping every rank. Check the data and the learning rate; "
                             "resume from the last checkpoint with trainer.resume=auto")

    def state_dict(self) -> dict:
        """The step's own counters for a checkpoint's state.json (the tensors are the checkpointer's)."""
        state = {"nonfinite_skips": self.nonfinite_skips}
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


def build_train_step(cfg: ExperimentConfig, dist: DistInfo, components: Components,
                     compile_kwargs: dict | None = None) -> TrainStep:
    """Everything a step touches, from the networks as built (`components`, whose UNet is parallelized
    in place and whose frozen networks move to the device in `model.frozen_dtype`). `compile_kwargs`
    go to every torch.compile call (benchmark checks: a cheaper backend)."""
    t, p, device = cfg.trainer, cfg.parallel, dist.device
    unet = components.unet
    trained_names = mark_trainable(unet, t.trainable)
    n_trained = sum(q.numel() for q in unet.parameters() if q.requires_grad)
    n_total = sum(q.numel() for q in unet.parameters())
    log.info("UNet: %.1fM parameters, training %.1fM (%s)", n_total / 1e6, n_trained / 1e6, t.trainable)
    if p.fast_paths:
        from fff_vdi.models.fast_paths import apply_fast_paths

        log.info("UNet fast paths: %s", apply_fast_paths(unet))
    updated = updated_parameter_names(unet, t.trainable, p.fast_paths)
    if len(updated) < len(trained_names):  # no optimizer state for parameters that cannot change the output
        log.info("fast paths: %d parameter tensors no longer reach the output and stay frozen",
                 len(trained_names) - len(updated))
    unet.to(device)
    unet.train()
    unet = parallelize_unet(unet, p, dist.world_size, device, compile_kwargs=compile_kwargs)
    optimizer = build_optimizer(trainable_parameters(unet), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    # The EMA's names are the state dict's, which the export reads back.
    ema = (EMA([(state_dict_name(n), q) for n, q in unet.named_parameters() if q.requires_grad], cfg.optim.ema_decay)
           if cfg.optim.ema_decay > 0 else None)
    scaler = torch.amp.GradScaler(device.type, enabled=p.autocast == "float16" and device.type == "cuda")
    if p.autocast == "float16" and device.type != "cuda":
        log.info("parallel.autocast=float16 is CUDA's: float32 without autocast or loss scaling on the CPU")
    conditioner = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters, DTYPES[cfg.model.frozen_dtype],
                                    device, flow_scale=cfg.model.flow_scale)
    if p.compile_frozen:
        conditioner.compile(**(compile_kwargs or {}))
    return TrainStep(cfg, dist, unet, conditioner, optimizer, scheduler, ema, scaler)
