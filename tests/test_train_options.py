"""The trainer's options on the CPU with gloo and the tiny pipeline, each run on its own (no shared
straight run, so these spread over the test workers apart from tests/test_train.py): the options the
published recipe leaves off, together, then a resume; a non-finite loss stopping every rank; a full disk
at a checkpoint, or before the first step, stopping every rank with one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_tool, snapshot
from fff_vdi.train.optim import TEMPORAL_PATTERNS
from fff_vdi.train.validate import VIDEO_TAG
from test_train import launch, losses, overrides


def test_accumulation_ema_async_checkpoints_cosine_clipping_and_nan_skips(tiny_pipeline, synthetic_shards, tmp_path):
    """The options the published recipe leaves off, together on two processes, then a resume:
    gradient accumulation, sharded EMA, async DCP saves, warmup + cosine, clipping of the sharded
    gradients, the skip policy for a non-finite step; and validation under FSDP. In bf16, where the
    frozen parameters are replicated in bf16: the export still writes them exactly as loaded."""
    run = tmp_path / "options"
    extra = {"experiment.parallel.mixed_precision": "bfloat16", "experiment.model.frozen_dtype": "bfloat16",
             "experiment.trainer.grad_accum": 2, "experiment.optim.ema_decay": 0.9,
             "experiment.trainer.async_checkpoint": "true", "experiment.optim.schedule": "cosine",
             "experiment.optim.warmup_steps": 2, "experiment.optim.grad_clip": 0.01,
             "experiment.trainer.nonfinite": "skip",
             "experiment.trainer.max_steps": 4, "experiment.trainer.checkpoint_every": 2,
             "experiment.trainer.export_at_end": "true", "experiment.trainer.validate_every": 4,
             "experiment.trainer.val_steps": 1}
    proc = launch(overrides(tiny_pipeline, synthetic_shards, run, **extra), nproc=2, faults={"FFF_VDI_TEST_NAN_AT_STEP": "3"})
    assert "non-finite loss at step 3" in proc.stderr and "update skipped (1 of 10 allowed skips)" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] is None and all(r["loss"] > 0 for r in records if r["step"] != 3)  # skipped: null
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-4 * 0.5) and lrs[1] == pytest.approx(1e-4)  # linear warmup over 2 steps
    assert lrs[2] == pytest.approx(1e-4) and lrs[3] == pytest.approx(0.5e-4)  # cosine: halfway at step 4 of 2..4
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["data"]["position"] == 4 * 2 * 2  # 4 steps x 2 micro-steps x 2 ranks
    assert state["trainer"]["nonfinite_skips"] == 1
    assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    # Validation at step 4: a video file, and the sample and scores in TensorBoard.
    assert (run / "validation" / "step-00000004.mp4").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert VIDEO_TAG in events.Tags()["images"]
    assert {"val/hole_psnr_db", "val/hole_ssim", "val/ewarp_x1e3", "train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    # The EMA weights export from the checkpoint, on the CPU, without a process group.
    run_tool("-m", "fff_vdi.train.export", "--run", str(run), "--ema", "--out", str(tmp_path / "ema_pipeline"))
    again = run_tool("-m", "fff_vdi.train.export", "--run", str(run), "--out", str(tmp_path / "ema_pipeline"), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing export is replaced only when asked
    before = snapshot(run)
    for out in (run, run.parent):  # once exited 0 after deleting the whole run
        proc = run_tool("-m", "fff_vdi.train.export", "--run", str(run), "--out", str(out), "--overwrite", check=False)
        assert proc.returncode == 2 and "never replaced" in proc.stderr
    assert snapshot(run) == before
    from safetensors.torch import load_file

    trained = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(tmp_path / "ema_pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    refiner = "noise_refiner.fuse.0.weight"
    assert not torch.equal(trained[refiner], ema[refiner])  # EMA lags the trained weights
    # Frozen parameters exported exactly as loaded (fp32), not as the bf16 copies training used.
    base = load_file(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in base if not any(t in k for t in TEMPORAL_PATTERNS)]
    assert frozen and all(trained[k].dtype == torch.float32 and torch.equal(trained[k], base[k].float())
                          for k in frozen)
    assert any(not torch.equal(base[k].to(torch.bfloat16).float(), base[k].float()) for k in frozen)  # can fail
    assert not torch.equal(trained[refiner], base[refiner].float())  # and the trained ones did train
    # Resume (EMA, optimizer and scheduler state) and finish two more steps.
    launch(overrides(tiny_pipeline, synthetic_shards, run, **{**extra, "experiment.trainer.max_steps": 6}), nproc=2)
    assert max(losses(run)) == 6


def test_non_finite_loss_stops_every_rank_with_the_step(tiny_pipeline, synthetic_shards, tmp_path):
    run = tmp_path / "nan"
    proc = launch(overrides(tiny_pipeline, synthetic_shards, run), nproc=2, check=False,
                  faults={"FFF_VDI_TEST_NAN_AT_STEP": "2"})
    assert proc.returncode != 0
    for rank in (0, 1):
        log = (run / "logs" / f"rank-{rank:05d}.log").read_text()
        assert "non-finite loss at step 2" in log
    assert max(losses(run)) == 1  # step 2 never completed


def test_a_full_disk_at_a_checkpoint_stops_every_rank_with_one_line(tiny_pipeline, synthetic_shards, tmp_path):
    """Rank 1's disk is full when step 2 is saved: DCP's "unexpected pos 704 vs 598" traceback once; now
    one line naming the checkpoint, the cause and what a relaunch resumes from, as torchrun's root cause."""
    run = tmp_path / "full"
    proc = launch(overrides(tiny_pipeline, synthetic_shards, run, **{"experiment.trainer.checkpoint_every": 2}),
                  nproc=2, check=False, faults={"FFF_VDI_TEST_FULL_DISK_ON_RANK": "1"})
    assert proc.returncode != 0
    message = f"error: checkpoint {run / 'checkpoints' / 'step-00000002'} could not be written ("
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert f"traceback : {message}" in root_cause, proc.stderr[-3000:]
    assert "launch the same command again: no checkpoint is complete yet: it starts over" in root_cause
    printed = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(printed) == 2 and all(line.startswith(message) for line in printed), proc.stderr[-3000:]  # each rank
    assert proc.stderr.count("Traceback") == 1  # torchrun's own ChildFailedError report only
    assert max(losses(run)) == 2 and not (run / "checkpoints" / "step-00000002" / "COMPLETE").exists()


def test_a_full_disk_before_the_first_step_stops_with_one_line(tiny_pipeline, synthetic_shards, tmp_path):
    """config.yaml cannot be written (the disk is full for rank 0 past 1,500 bytes): one line naming the
    run's folder and the cause, torchrun's root cause; no traceback of ours."""
    run = tmp_path / "full"
    proc = launch(overrides(tiny_pipeline, synthetic_shards, run), nproc=1, check=False,
                  faults={"FFF_VDI_TEST_FULL_DISK_ON_RANK": "0:1500"})
    message = f"error: {run}: File too large; fix that (free space, quota, permissions) and launch the same command"
    assert proc.returncode != 0 and proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]  # torchrun's own
    assert f"traceback : {message}" in proc.stderr.split("Root Cause (first observed failure):")[-1], proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        message + " again: it resumes from the newest complete checkpoint"]


def test_a_checkpoint_write_error_names_the_cause_and_the_checkpoint_to_resume_from(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    from fff_vdi.train.checkpoint import MARKER, CheckpointWriteError, step_dir

    root = tmp_path / "checkpoints"
    (step_dir(root, 4) / MARKER).parent.mkdir(parents=True)
    (step_dir(root, 4) / MARKER).write_text("{}")
    step_dir(root, 6).mkdir()  # unfinished: not a checkpoint to resume from
    full = OSError(28, "No space left on device", str(step_dir(root, 8) / "__1_0.distcp"))
    message = str(CheckpointWriteError(root, step_dir(root, 8), CheckpointException("save", {3: (full, None)})))
    assert message.startswith(f"checkpoint {step_dir(root, 8)} could not be written ({step_dir(root, 8)}/__1_0.distcp: "
                              "No space left on device; ")
    assert message.endswith("launch the same command again: it resumes from step-00000004"), message
