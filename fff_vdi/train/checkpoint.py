"""Training checkpoints with torch.distributed.checkpoint (DCP): resharded on load, so a run can
resume on another number of GPUs.

Layout of `<run_dir>/checkpoints/`:

    step-00001000/          DCP shards + .metadata: model (trained parameters), optimizer, EMA
    step-00001000/state.json          LR scheduler, data-loader position, trainer counters (rank 0)
    step-00001000/rng/rank-00000.pt   this rank's torch/numpy/python RNG states
    step-00001000/COMPLETE  written by rank 0 last, after every rank finished writing

A folder counts only once COMPLETE exists: `resume=auto` takes the newest complete one, and an
interrupted save is cleaned up later. The newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fff_vdi.distributed.env import barrier, is_distributed
from fff_vdi.errors import FFFVDIError
from fff_vdi.utils.atomic import atomic_write_json
from fff_vdi.utils.paths import os_error_text

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / MARKER).exists()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(root: Path, resume: str) -> Optional[Path]:
    """'none' -> None; 'auto' -> newest complete checkpoint or None; else that folder (must be complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FFFVDIError(f"trainer.resume={resume!r}: {path} is not a complete checkpoint (no {MARKER} file); "
                          f"complete ones under {root}: {[p.name for _, p in list_checkpoints(root)] or 'none'}")
    return path


class CheckpointWriteError(FFFVDIError):
    """A checkpoint could not be written (a full disk, a quota, permissions): one line naming it, its
    cause and the checkpoint a relaunch resumes from, where a bare traceback (DCP's reads "unexpected
    pos 704 vs 598" for a full disk) would leave the user guessing."""

    def __init__(self, root: Path, path: Path, error: BaseException):
        cause = error
        if isinstance(error, CheckpointException) and error.failures:  # a rank's error, gathered by DCP
            cause = error.failures[min(error.failures)][0]
        text = os_error_text(cause, path) if isinstance(cause, OSError) else (
            f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}")
        complete = list_checkpoints(root)
        try:
            free = f"{shutil.disk_usage(root).free / 1e9:.1f} GB free there"
        except OSError:
            free = "free space unknown"
        resume = f"it resumes from {complete[-1][1].name}" if complete else "no checkpoint is complete yet: it starts over"
        super().__init__(f"checkpoint {path} could not be written ({text}; {free}): fix that (free space, quota, "
                         f"permissions) and launch the same command again: {resume}")


@contextlib.contextmanager
def writing_checkpoint(root: Path, path: Path):
    """Failures to write the checkpoint `path` as CheckpointWriteError (torch.save reports a failed
    write as a RuntimeError); a failed collective (DistError, also a RuntimeError) stays what it is."""
    try:
        yield
    except dist.DistError:
        raise
    except (OSError, RuntimeError, CheckpointException) as e:
        raise CheckpointWriteError(root, path, e) from e


class _Stateful:
    """Adapter giving DCP the state_dict/load_state_dict protocol for the model + optimizer pair, so
    that DCP resolves FSDP's DTensor shards and resharding on load."""

    def __init__(self, model, optimizer, frozen_in_checkpoint: bool):
        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(ignore_frozen_params=not frozen_in_checkpoint)

    def state_dict(self):
        return {"model": get_model_state_dict(self.model, options=self.options),
                "optim": get_optimizer_state_dict(self.model, self.optimizer, options=self.options)}

    def load_state_dict(self, state):
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=self.options)


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root: Path, rank: int, world_size: int, keep: int, async_save: bool = False,
                 frozen_in_checkpoint: bool = False):
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep = keep
        self.async_save = async_save
        self.frozen_in_checkpoint = frozen_in_checkpoint
        self._pending: Optional[tuple[int, object]] = None  # (step, future) of an async save
        self._async_group = None
        if async_save and is_distributed():
            # The background writer runs collectives from its own thread: give it its own group.
            self._async_group = dist.new_group(backend="gloo")

    def _tensor_state(self, model, optimizer, ema) -> dict:
        state = {"app": _Stateful(model, optimizer, self.frozen_in_checkpoint)}
        if ema is not None:
            state["ema"] = ema.state_dict()
        return state

    def save(self, step: int, model, optimizer, scheduler, ema, data_state: dict, trainer_state: dict) -> Path:
        self.wait()  # at most one save in flight
        path = step_dir(self.root, step)
        with writing_checkpoint(self.root, path):
            if self.rank == 0:
                if path.exists():  # an earlier, interrupted save of this step
                    shutil.rmtree(path)
                (path / "rng").mkdir(parents=True)
            barrier()
            torch.save(capture_rng(), path / "rng" / f"rank-{self.rank:05d}.pt")
            if self.rank == 0:
                atomic_write_json(path / "state.json", {
                    "format": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                    "scheduler": scheduler.state_dict(), "data": data_state, "trainer": trainer_state})
            state = self._tensor_state(model, optimizer, ema)
            t0 = time.perf_counter()
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=self._async_group)
                self._pending = (step, future)
                log.info("checkpoint %s: staged in %.1fs, writing in the background", path.name, time.perf_counter() - t0)
            else:
                dcp.save(state, checkpoint_id=str(path))
                self._finalize(step)
                log.info("checkpoint %s: saved in %.1fs", path.name, time.perf_counter() - t0)
        return path

    def wait(self) -> None:
        """Finish an async save in flight (every rank), then mark it complete."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        with writing_checkpoint(self.root, step_dir(self.root, step)):
            future.result()
            self._finalize(step)

    def _finalize(self, step: int) -> None:
        barrier()  # every rank's shards are on disk
        if self.rank == 0:
            path = step_dir(self.root, step)
            atomic_write_json(path / MARKER, {"step": step, "world_size": self.world_size, "time": time.time()})
            self._prune()
        barrier()

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        newest = complete[-1][0] if complete else -1
        for step, path in complete[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for step, path in list_checkpoints(self.root, complete_only=False):
            if step < newest and not (path / MARKER).exists():  # abandoned partial save
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler, ema) -> tuple[dict, dict]:
        """Restore model/optimizer/scheduler/EMA in place; returns (data_state, trainer_state)."""
        meta = json.loads((Path(path) / "state.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise FFFVDIError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
        state = self._tensor_state(model, optimizer, ema)
        dcp.load(state, checkpoint_id=str(path))
        scheduler.load_state_dict(meta["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        trainer_state = dict(meta["trainer"], world_size=meta["world_size"], step=meta["step"])
        rng_file = Path(path) / "rng" / f"rank-{self.rank:05d}.pt"
        if meta["world_size"] == self.world_size and rng_file.exists():
            restore_rng(torch.load(rng_file, weights_only=False))
        else:  # per-rank streams are re-derived from (seed, rank, step); see objective.step_generator
            log.info("checkpoint %s: saved on %s ranks, resuming on %d: RNG states re-derived from the seed",
                     Path(path).name, trainer_state.get("world_size"), self.world_size)
        return meta["data"], trainer_state
