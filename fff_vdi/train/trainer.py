"""The trainer: a linear build, then `while step < max_steps: train_step()`.

Build order (torchtitan's): process group and seeds -> networks -> FLOP count -> trainable set ->
`parallelize_unet` -> optimizer, scheduler, EMA -> frozen conditioner -> data loader -> checkpointer
and resume -> metrics. Every decision that ends or changes the loop (stop on a non-finite loss,
save on preemption) is agreed across ranks, and every rank takes the same number of steps.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fff_vdi.config import ExperimentConfig, validate
from fff_vdi.data.loader import ClipLoader
from fff_vdi.distributed.env import (
    DistInfo,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown,
)
from fff_vdi.distributed.parallelize import frozen_originals, parallelize_unet
from fff_vdi.errors import FFFVDIError
from fff_vdi.models.components import Components, build_random_components, load_components
from fff_vdi.train.checkpoint import Checkpointer, resolve_resume
from fff_vdi.train.export import export_pipeline
from fff_vdi.train.gc_schedule import ScheduledGC
from fff_vdi.train.metrics import PEAK_BF16_FLOPS, Heartbeat, MetricsWriter, count_train_flops, peak_memory_gib
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
from fff_vdi.train.preemption import PreemptionFlag, requeue_after
from fff_vdi.utils.atomic import atomic_write_text

log = logging.getLogger("fff_vdi.train")


class NonFiniteError(FFFVDIError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console; every rank logs to run_dir/logs/rank-NNNNN.log."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fh = logging.FileHandler(run_dir / "logs" / f"rank-{rank:05d}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    for noisy in ("diffusers", "transformers", "torch.distributed", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_components(cfg: ExperimentConfig, seed: int, device: torch.device | None = None) -> Components:
    """The networks from the pretrained source, or random from bundled configs (drawn on `device`:
    initialising 2.5B parameters on a GPU takes seconds, on the CPU minutes)."""
    m = cfg.model
    if m.random_init:
        return build_random_components(m.random_init, seed=seed, device=device)
    return load_components(m.pretrained, revision=m.revision, unet=m.unet, raft=m.raft,
                           flow_completion=m.flow_completion)


def unet_train_flops(unet_config: dict, trainable: set[str], batch: int, frames: int, height: int, width: int,
                     latent_channels: int, cross_dim: int) -> int:
    """FLOPs of one UNet forward + backward at the training shapes, counted on the meta device
    without activation checkpointing (no recomputation counted)."""
    from fff_vdi.models.unet import FFFVDIUNet

    with torch.device("meta"):
        # diffusers makes a few parameters with torch.Tensor([...]), which ignores the device context.
        unet = FFFVDIUNet.from_config(unet_config).to("meta")
        for name, p in unet.named_parameters():
            p.requires_grad_(name in trainable)
        h, w = height // 8, width // 8
        sample = torch.randn(batch, frames, 2 * latent_channels, h, w)
        masks = torch.zeros(batch, frames, 1, height, width)
        flows = (torch.zeros(batch, frames - 1, 2, height, width),) * 2
        sigma = torch.ones(batch)
        embeds = torch.randn(batch, 1, cross_dim)
        time_ids = torch.ones(batch, 3)

    def run():
        with torch.device("meta"):  # tensors the model creates inside forward land on meta too
            unet(sample, masks, flows, sigma, embeds, time_ids).float().square().mean().backward()

    return count_train_flops(run)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, resolved_yaml: str, preemption: PreemptionFlag):
        # `preemption` is installed before the (minutes-long) setup, so that a preemption signal arriving
        # now is held until the first step boundary instead of killing this rank with the default action.
        self.preemption = preemption
        self.cfg = validate(cfg)
        t = cfg.trainer
        self.dist: DistInfo = init_distributed(cfg.parallel.nccl_timeout_s)
        self.device = self.dist.device
        self.run_dir = Path(cfg.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resolved_yaml:
                atomic_write_text(self.run_dir / "config.yaml", resolved_yaml)
        barrier()
        setup_logging(self.run_dir, self.dist.rank)
        set_determinism(t.seed + self.dist.rank, t.deterministic)
        log.info("run %s: %d process(es), device %s, output %s", cfg.name, self.dist.world_size, self.device, self.run_dir)

        components = build_components(cfg, seed=t.seed, device=self.device)
        unet = components.unet
        trained_names = mark_trainable(unet, t.trainable)
        n_trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in unet.parameters())
        log.info("UNet: %.1fM parameters, training %.1fM (%s)", n_total / 1e6, n_trained / 1e6, t.trainable)
        d = cfg.data
        self.unet_config = dict(unet.config)
        # MFU counts the published model's work (the fast paths below remove some of it).
        self.flops_per_step = t.grad_accum * unet_train_flops(
            self.unet_config, set(trained_names), d.batch_size, d.num_frames, d.height, d.width,
            unet.config.out_channels, unet.config.cross_attention_dim)
        log.info("UNet forward+backward: %.2f TFLOP per optimizer step per rank", self.flops_per_step / 1e12)

        self.compute_dtype = DTYPES[cfg.parallel.mixed_precision]
        if cfg.parallel.fast_paths:
            from fff_vdi.models.fast_paths import apply_fast_paths

            log.info("UNet fast paths: %s", apply_fast_paths(unet))
        updated = updated_parameter_names(unet, t.trainable, cfg.parallel.fast_paths)
        if len(updated) < len(trained_names):  # no optimizer state for parameters that cannot change the output
            log.info("fast paths: %d parameter tensors no longer reach the output and stay frozen",
                     len(trained_names) - len(updated))
        unet.to(self.device)
        unet.train()
        # parallelize_unet casts the frozen parameters to the compute dtype (unless shard_frozen): the
        # export writes them as loaded, from this copy (rank 0 writes the export).
        keep_originals = self.dist.is_main and t.export_at_end and not cfg.parallel.shard_frozen
        self.frozen_originals = frozen_originals(unet) if keep_originals else None
        self.unet = parallelize_unet(unet, cfg.parallel, self.dist.world_size, self.device)
        self.params = trainable_parameters(self.unet)
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.ema = (EMA([(n, p) for n, p in self.unet.named_parameters() if p.requires_grad], cfg.optim.ema_decay)
                    if cfg.optim.ema_decay > 0 else None)

        self.conditioner = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters,
                                             DTYPES[cfg.model.frozen_dtype], self.device)
        if cfg.parallel.compile_frozen:
            self.conditioner.compile()
        self.components = components  # frozen networks (and the export's template)
        self.loader = ClipLoader(cfg.data, self.dist.rank, self.dist.world_size, self.device)
        log.info("data: %d videos in %s (%s backend), %d global batches per epoch", len(self.loader.source),
                 cfg.data.shards, self.loader.backend, self.loader.batches_per_epoch)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.dist.rank, self.dist.world_size,
                                         keep=t.keep_checkpoints, async_save=t.async_checkpoint,
                                         frozen_in_checkpoint=t.trainable == "all")
        self.step = 0
        self.nonfinite_skips = 0
        resume = resolve_resume(self.run_dir / "checkpoints", t.resume)
        if resume is not None:
            data_state, trainer_state = self.checkpointer.load(resume, self.unet, self.optimizer, self.scheduler, self.ema)
            self.loader.load_state_dict(data_state)
            self.step = int(trainer_state["step"])
            self.nonfinite_skips = int(trainer_state.get("nonfinite_skips", 0))
            log.info("resumed from %s at step %d (data position %d)", resume, self.step, self.loader.position)

        self.metrics = MetricsWriter(self.run_dir, enabled=self.dist.is_main)
        self.heartbeat = Heartbeat(self.dist.rank, t.heartbeat_s)
        self.validator = None
        if t.validate_every > 0:
            from fff_vdi.train.validate import Validator

            self.validator = Validator(cfg, self.run_dir, self.dist, self.conditioner, components)

    # -- one optimizer step ----------------------------------------------------------------------

    def train_step(self) -> dict:
        t = self.cfg.trainer
        timings = {"data": 0.0, "conditioning": 0.0, "unet": 0.0}
        losses = []
        for micro in range(t.grad_accum):
            tick = time.perf_counter()
            batch = next(self.loader)
            timings["data"] += time.perf_counter() - tick
            gen = step_generator(t.seed, self.dist.rank, self.step, micro, self.device)
            tick = time.perf_counter()
            cond = self.conditioner(batch["pixel_values"], batch["mask_values"], gen)
            timings["conditioning"] += time.perf_counter() - tick
            tick = time.perf_counter()
            last = micro == t.grad_accum - 1
            if hasattr(self.unet, "set_requires_gradient_sync"):  # FSDP2: reduce only after the last micro-step
                self.unet.set_requires_gradient_sync(last)
            loss = edm_loss(self.unet, cond, self.cfg.objective, gen, self.compute_dtype)
            if self.step + 1 == t.inject_nan_at_step:
                loss = loss * float("nan")
            (loss / t.grad_accum).backward()
            timings["unet"] += time.perf_counter() - tick
            losses.append(loss.detach())

        loss = all_reduce_mean(torch.stack(losses).mean().float().view(1)).item()
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip).item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # both are already global values
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite(loss, grad_norm)
        else:
            tick = time.perf_counter()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
            timings["optimizer"] = time.perf_counter() - tick
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, **{f"time_{k}": v for k, v in timings.items()}}

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        t = self.cfg.trainer
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.step + 1} " \
               f"(loss {loss}, grad norm {grad_norm})"
        if t.nonfinite == "skip" and self.nonfinite_skips < t.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning("%s: update skipped (%d of %d allowed skips)", what, self.nonfinite_skips, t.max_nonfinite_skips)
            return
        raise NonFiniteError(f"{what}: stopping every rank. Check the data and the learning rate; "
                             "resume from the last checkpoint with trainer.resume=auto")

    # -- the loop --------------------------------------------------------------------------------

    def save(self) -> None:
        self.checkpointer.save(self.step, self.unet, self.optimizer, self.scheduler, self.ema,
                               self.loader.state_dict(),
                               {"nonfinite_skips": self.nonfinite_skips, "config": asdict(self.cfg)})

    def run(self) -> int:
        t = self.cfg.trainer
        self.heartbeat.start()
        progress = None
        if self.dist.is_main and t.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        steps_this_run = 0
        gc_schedule = ScheduledGC(t.gc_every).start()
        try:
            while self.step < t.max_steps:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                tick = time.perf_counter()
                out = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                gc_schedule.tick()  # inside the step's time: what a collection costs shows in the metrics
                step_time = time.perf_counter() - tick
                steps_this_run += 1
                self.heartbeat.beat(self.step)
                self._log(out, step_time)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{out['loss']:.4f}")
                if self.validator is not None and self.step % t.validate_every == 0:
                    self.validator.run(self.unet, self.step, self.metrics)
                preempted = self.preemption.agree(self.device)  # the signal every rank acts on, or None
                if preempted or self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self.save()
                    gc_schedule.collect_all()
                if preempted:
                    self.checkpointer.wait()  # complete before a requeue ends this job
                    log.info("preemption signal (%s): saved step %d, exiting", preempted.name, self.step)
                    requeue_after(preempted, self.dist.is_main)
                    return 0
                if t.stop_after_steps and steps_this_run >= t.stop_after_steps:
                    log.info("stop_after_steps=%d reached at step %d", t.stop_after_steps, self.step)
                    return 0
            self.checkpointer.wait()
            if t.export_at_end:
                export_pipeline(self.unet, self.components, self.unet_config, self.run_dir / "pipeline",
                                self.dist.is_main, frozen=self.frozen_originals)
            return 0
        finally:
            gc_schedule.stop()
            self.checkpointer.wait()
            if progress is not None:
                progress.close()
            self.heartbeat.stop()
            self.preemption.uninstall()
            self.metrics.close()
            self.loader.close()

    def _log(self, out: dict, step_time: float) -> None:
        t, d = self.cfg.trainer, self.cfg.data
        clips = d.batch_size * t.grad_accum * self.dist.world_size
        values = {
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": out["lr"],
            "step_time_s": step_time,
            "clips_per_s": clips / step_time,
            "frames_per_s": clips * d.num_frames / step_time,
            "data_wait_share": out["time_data"] / step_time,
            "conditioning_s": out["time_conditioning"],
            "unet_s": out["time_unet"],
            "peak_memory_gib": peak_memory_gib(self.device),
            "epoch": self.loader.epoch,
        }
        if self.device.type == "cuda":
            values["mfu"] = self.flops_per_step / step_time / PEAK_BF16_FLOPS
        self.metrics.write(self.step, values)
        if self.step % t.log_every == 0 or self.step == 1:
            log.info("step %d: loss %.5f, grad norm %.3g, lr %.3g, %.2f s/step, %.2f clips/s, data wait %.1f%%%s",
                     self.step, values["loss"], values["grad_norm"], values["lr"], step_time, values["clips_per_s"],
                     100 * values["data_wait_share"], f", MFU {100 * values['mfu']:.1f}%" if "mfu" in values else "")


def run_training(cfg: ExperimentConfig, resolved_yaml: str = "", preemption: PreemptionFlag | None = None) -> int:
    """Entry point of launch/train.py: train, then leave the process group cleanly. `preemption`: a flag
    the caller installed as early as it could (one is installed here otherwise)."""
    if preemption is None:
        preemption = PreemptionFlag().install()
    try:
        trainer = Trainer(cfg, resolved_yaml, preemption)
        return trainer.run()
    except FFFVDIError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        preemption.uninstall()
        shutdown()
