"""The trainer: a linear build, then `while step < max_steps: train_step()`.

Build order (torchtitan's): process group and seeds -> networks -> FLOP count -> the training step
(train/step.py: trainable set, `parallelize_unet`, optimizer, scheduler, EMA, frozen conditioner; the
same step bench/train_step.py times) -> data loader -> checkpointer and resume -> metrics. Every
decision that ends or changes the loop (stop on a non-finite loss, save on preemption) is agreed
across ranks inside the step, and every rank takes the same number of steps.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fff_vdi.conditioning.reader import open_training_cache
from fff_vdi.config import ExperimentConfig, validate
from fff_vdi.data.loader import ClipLoader, resolve_backend
from fff_vdi.distributed.env import DistInfo, barrier, init_distributed, shutdown
from fff_vdi.errors import FFFVDIError, write_launcher_error
from fff_vdi.models.components import build_components
from fff_vdi.train.checkpoint import Checkpointer, resolve_resume, step_dir
from fff_vdi.train.compile_artifacts import CompileArtifacts
from fff_vdi.train.export import export_pipeline
from fff_vdi.train.gc_schedule import ScheduledGC
from fff_vdi.train.metrics import PEAK_BF16_FLOPS, Heartbeat, MetricsWriter, peak_memory_gib, unet_train_flops
from fff_vdi.train.preemption import PreemptionFlag, requeue_after
from fff_vdi.train.step import StepOutput, backend_settings, build_train_step
from fff_vdi.utils.atomic import atomic_write_text
from fff_vdi.utils.paths import os_error_text

log = logging.getLogger("fff_vdi.train")


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
    # Hydra's logging preset (disable_existing_loggers) silenced the loggers made before it ran, such as
    # fff_vdi.train.preemption's (launch/train.py imports it first): ours all log.
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("fff_vdi") and isinstance(logger, logging.Logger):
            logger.disabled = False


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds, and deterministic kernels when asked (TF32 and cuDNN autotuning: step.backend_settings)."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True


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

        # A precomputed conditioning cache (data.conditioning), checked before the minutes of set-up.
        self.conditioning_cache = open_training_cache(cfg, resolve_backend(cfg.data.backend, self.device))
        components = build_components(cfg.model, seed=t.seed, device=self.device)
        if self.conditioning_cache is not None:
            self.conditioning_cache.check_networks(components, cfg)
        d = cfg.data
        # MFU counts the published model's work (the fast paths remove some of it).
        self.flops_per_step = t.grad_accum * unet_train_flops(
            dict(components.unet.config), t.trainable, d.batch_size, d.num_frames, d.height, d.width)
        log.info("UNet forward+backward: %.2f TFLOP per optimizer step per rank", self.flops_per_step / 1e12)
        p = cfg.parallel
        self.compile_artifacts = CompileArtifacts(self.run_dir, self.dist.rank, self.dist.local_rank, self.device,
                                                  enabled=p.compile_artifacts and (p.compile or p.compile_frozen))
        self.compile_artifacts.load()  # before anything compiles
        self.train_step = build_train_step(cfg, self.dist, components)
        self.unet = self.train_step.unet
        self.loader = ClipLoader(cfg.data, self.dist.rank, self.dist.world_size, self.device,
                                 conditioning=self.conditioning_cache)
        log.info("data: %d videos in %s (%s backend), %d global batches per epoch", len(self.loader.source),
                 cfg.data.shards, self.loader.backend, self.loader.batches_per_epoch)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.dist.rank, self.dist.world_size,
                                         keep=t.keep_checkpoints, async_save=t.async_checkpoint,
                                         frozen_in_checkpoint=t.trainable == "all")
        self.step = 0
        resume = resolve_resume(self.run_dir / "checkpoints", t.resume)
        if resume is not None:
            s = self.train_step
            data_state, trainer_state = self.checkpointer.load(resume, self.unet, s.optimizer, s.scheduler, s.ema)
            self.loader.load_state_dict(data_state)
            self.step = int(trainer_state["step"])
            s.load_state_dict(trainer_state)
            log.info("resumed from %s at step %d (data position %d)", resume, self.step, self.loader.position)

        self.metrics = MetricsWriter(self.run_dir, enabled=self.dist.is_main, start_step=self.step)
        self.heartbeat = Heartbeat(self.dist.rank, t.heartbeat_s)
        self.validator = None
        if t.validate_every > 0:
            from fff_vdi.train.validate import Validator

            self.validator = Validator(cfg, self.run_dir, self.dist, components)

    def save(self) -> None:
        s = self.train_step
        self.checkpointer.save(self.step, self.unet, s.optimizer, s.scheduler, s.ema, self.loader.state_dict(),
                               {**s.state_dict(), "config": asdict(self.cfg)})
        self.compile_artifacts.save()  # what was compiled since the last write (e.g. validation's graphs)

    def export(self) -> None:
        """Rank 0 writes `<run_dir>/pipeline/` from the final checkpoint (train/export.py: the one export
        path); random weights are drawn again where training drew them."""
        if not self.dist.is_main:
            return
        checkpoint = resolve_resume(self.run_dir / "checkpoints", str(step_dir(self.run_dir / "checkpoints", self.step)))
        export_pipeline(self.cfg, checkpoint, self.run_dir / "pipeline", overwrite=True,
                        device=self.device if self.cfg.model.random_init else None)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        t = self.cfg.trainer
        self.heartbeat.start()
        progress = None
        if self.dist.is_main and t.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        gc_schedule = ScheduledGC(t.gc_every).start()
        try:
            if self.validator is not None and t.validate_at_start and self.step == 0:
                self.validator.run(self.unet, 0, self.metrics)
            first_step = self.step
            with backend_settings(self.cfg.parallel, t.deterministic):
                while self.step < t.max_steps:
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    # No synchronisation at the step's end: the step waits for the GPU once, mid-step, so
                    # over many steps the time from one step's start to the next is the GPU's step time.
                    tick = time.perf_counter()
                    out = self.train_step(self.loader, self.step, stop_requested=self.preemption.code)
                    gc_schedule.tick()  # inside the step's time: what a collection costs shows in the metrics
                    step_time = time.perf_counter() - tick
                    self.step += 1
                    self.heartbeat.beat(self.step)
                    self._log(out, step_time)
                    if self.step == first_step + 1:  # this process's compilation is done: keep it for a restart
                        self.compile_artifacts.save()
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{out.loss:.4f}")
                    if self.validator is not None and self.step % t.validate_every == 0:
                        self.validator.run(self.unet, self.step, self.metrics)
                    preempted = self.preemption.signal_of(out.stop)  # the strongest any rank received, or None
                    if preempted or self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                        self.save()
                        gc_schedule.collect_all()
                    if preempted:
                        self.checkpointer.wait()  # complete before a requeue ends this job
                        log.info("preemption signal (%s): saved step %d, exiting", preempted.name, self.step)
                        requeue_after(preempted, self.dist.is_main)
                        return 0
                self.checkpointer.wait()
                if t.export_at_end:
                    self.export()
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

    def _log(self, out: StepOutput, step_time: float) -> None:
        t, d = self.cfg.trainer, self.cfg.data
        clips = d.batch_size * t.grad_accum * self.dist.world_size
        values = {
            "loss": out.loss,
            "grad_norm": out.grad_norm,
            "lr": out.lr,
            "step_time_s": step_time,
            "clips_per_s": clips / step_time,
            "frames_per_s": clips * d.num_frames / step_time,
            "data_wait_share": out.host_s["data"] / step_time,
            "conditioning_s": out.host_s["conditioning"],
            "unet_s": out.host_s["unet"],
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


def training_failed(message: str) -> int:
    """One line, in the rank's log, on stderr and as torchrun's root cause: exit status 1."""
    log.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    write_launcher_error(f"error: {message}")
    return 1


def run_training(cfg: ExperimentConfig, resolved_yaml: str = "", preemption: PreemptionFlag | None = None) -> int:
    """Entry point of launch/train.py: train, then leave the process group cleanly. `preemption`: a flag
    the caller installed as early as it could (one is installed here otherwise)."""
    if preemption is None:
        preemption = PreemptionFlag().install()
    try:
        trainer = Trainer(cfg, resolved_yaml, preemption)
        return trainer.run()
    except FFFVDIError as e:
        return training_failed(str(e))
    except OSError as e:  # a full disk or failing drive outside a checkpoint: config.yaml, metrics, videos
        return training_failed(f"{os_error_text(e, cfg.output_dir)}; fix that (free space, quota, permissions) and "
                               "launch the same command again: it resumes from the newest complete checkpoint")
    finally:
        preemption.uninstall()
        shutdown()
