"""Does it learn? Training with our trainer and sampling with our sampler must make inpainting better.

A tiny FFF-VDI is trained by `launch/train.py` (one process, gloo: the trainer's whole code path) on
four synthetic clips of known motion, every UNet parameter at a high rate, and validated by the
trainer's own validation (fff_vdi/train/validate.py: the published sampler, metrics from
fff_vdi/eval/metrics.py) before the first step and after the last, on the same four videos under
the validation's masks. The claim checked: the chain trained-by-the-trainer + sampled-by-the-sampler
reproduces what it was trained on, measurably better than before training.

What it guards: every convention that training and sampling must share to agree on what the UNet's
output means: the EDM preconditioning (signs and scales of the input, skip and output factors, the
noise level as the UNet sees it), v-prediction as the sampler's scheduler reads it, which latent
channels hold the noisy and the condition latents, the condition latents' scale, the sampler's
Euler steps and first-frame inversion. Broken on purpose, each of these made the test fail: the output
preconditioning's sign flipped in fff_vdi/train/objective.py's edm_loss (+0.57 dB, where the intact
chain gains +2.08 dB: 18.48 -> 20.56, 2026-11-29). It replaces
test_train's paired "the loss falls when one clip is overfitted": learning that lowers the loss
without improving the sampled clips fails here. Conventions whose
breakage leaves what the model samples nearly unchanged are not this test's to catch: the embedding
dropout inverted (the CLIP embedding dropped 80% of the time) and the noise augmentation dropped;
tests/test_objective_conventions.py pins those.

Why it measures against the VAE's reconstruction: nothing can be downloaded and fitting a VAE takes
minutes on a CPU, so the VAE is random, and a random VAE's decoded frames look nothing like the
ground truth: PSNR against the ground truth would say nothing. The validation also reports the hole
PSNR against the VAE's reconstruction of the ground truth (`hole_psnr_vs_vae_db`): how close the
sampled latents come to the latents the UNet was trained to produce, which is exactly what the
conventions decide. The random VAE is given the two properties of SVD's that training relies on: a
sharp posterior (training encodes its targets by sampling it) and scaled latents of unit variance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_tool

NUM_VIDEOS, NUM_FRAMES, SIZE = 4, 4, 128
TRAIN_STEPS = 60
# The intact chain gains 2.1 dB in 60 steps; with the output scaling's sign flipped it gains 0.6.
MIN_GAIN_DB = 1.5
POSTERIOR_LOGVAR = -14.0  # std 1e-3: SVD's posterior is as sharp, relative to its latents' spread


@pytest.fixture(scope="module")
def sharp_pipeline(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny random pipeline with a sharp VAE posterior and unit-variance scaled latents."""
    from fff_vdi.data.synthetic import Scene
    from fff_vdi.models import load_components, save_pipeline
    from fff_vdi.models.encoders import encode_frames

    components = load_components(str(tiny_pipeline))
    vae = components.vae
    with torch.no_grad():
        latent_channels = vae.config.latent_channels
        vae.quant_conv.weight[latent_channels:] = 0  # log-variance: a constant
        vae.quant_conv.bias[latent_channels:] = POSTERIOR_LOGVAR
        rng = __import__("numpy").random.default_rng(0)
        frames = torch.stack([torch.from_numpy(Scene.random(rng, 1, SIZE, SIZE).render(0)[0]) for _ in range(8)])
        frames = frames.permute(0, 3, 1, 2).float()[None] / 127.5 - 1
        means = encode_frames(vae, frames, sample=False, scaled=False)
    vae.register_to_config(scaling_factor=1.0 / float(means.std()))
    return save_pipeline(components, tmp_path_factory.mktemp("learning") / "pipeline")


@pytest.fixture(scope="module")
def learning_run(sharp_pipeline, tmp_path_factory) -> Path:
    from fff_vdi.data.synthetic import write_synthetic_videos

    root = tmp_path_factory.mktemp("learning_run")
    src = write_synthetic_videos(root / "src", NUM_VIDEOS, NUM_FRAMES, SIZE, SIZE, seed=5, with_annotations=False)
    run_tool("tools/shard_ytvos.py", "--src", str(src), "--out", str(root / "shards"), "--workers", "1")
    run = root / "run"
    overrides = {
        "experiment": "tiny_cpu",
        "experiment.model.pretrained": sharp_pipeline,
        "experiment.model.raft_iters": 1,
        "experiment.data.shards": root / "shards",
        "experiment.data.num_frames": NUM_FRAMES,
        "experiment.data.height": SIZE,
        "experiment.data.width": SIZE,
        "experiment.data.num_workers": 0,
        "experiment.data.frame_steps": "[1]",
        "experiment.data.crop_scale": "[1.0,1.0]",
        "experiment.data.hflip_prob": 0.0,
        "experiment.data.masks.rectangles": 1.0,
        "experiment.data.masks.freeform": 0.0,
        "experiment.optim.lr": 1e-3,
        "experiment.output_dir": run,
        "experiment.trainer.trainable": "all",
        "experiment.trainer.max_steps": TRAIN_STEPS,
        "experiment.trainer.checkpoint_every": TRAIN_STEPS,
        "experiment.trainer.validate_every": TRAIN_STEPS,
        "experiment.trainer.validate_at_start": "true",
        "experiment.trainer.val_clips": NUM_VIDEOS,
        "experiment.trainer.val_steps": 4,
        "experiment.trainer.val_ewarp_flow": "dis",
        "experiment.trainer.deterministic": "true",
        "experiment.trainer.export_at_end": "false",
        "experiment.trainer.progress_bar": "false",
    }
    run_tool("launch/train.py", *(f"{k}={v}" for k, v in overrides.items()))
    return run


def validations(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "validation.jsonl").read_text().splitlines())}


def test_training_makes_the_sampled_clips_closer_to_what_it_was_trained_on(learning_run):
    records = validations(learning_run)
    assert sorted(records) == [0, TRAIN_STEPS]
    before, after = records[0]["hole_psnr_vs_vae_db"], records[TRAIN_STEPS]["hole_psnr_vs_vae_db"]
    assert after - before >= MIN_GAIN_DB, (
        f"hole PSNR against the VAE's reconstruction went from {before:.2f} dB untrained to {after:.2f} dB after "
        f"{TRAIN_STEPS} steps: training and sampling disagree on a convention (records: {records})")


def test_validation_shows_a_reader_the_curve_and_the_clips(learning_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fff_vdi.train.validate import VIDEO_TAG

    events = EventAccumulator(str(learning_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    names = ("hole_psnr_db", "hole_ssim", "ewarp_x1e3", "hole_psnr_vs_vae_db", "vae_hole_psnr_db", "duration_s")
    assert {f"val/{n}" for n in names} <= scalars and "train/loss" in scalars
    assert [e.step for e in events.Scalars("val/hole_psnr_db")] == [0, TRAIN_STEPS]
    videos = events.Images(VIDEO_TAG)
    assert [v.step for v in videos] == [0, TRAIN_STEPS]
    assert (videos[0].width, videos[0].height) == (3 * SIZE + 4, SIZE)  # masked input | output | ground truth
    assert sorted(p.name for p in (learning_run / "validation").iterdir()) == \
        ["step-00000000.mp4", f"step-{TRAIN_STEPS:08d}.mp4"]
    for record in validations(learning_run).values():
        assert set(names) <= set(record) and all(record[n] is not None for n in names)
