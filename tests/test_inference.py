"""Inference: the sampler against a transcription of the published loop, windowing and blending,
video I/O, and `python -m fff_vdi.inpaint` end to end on the DAVIS sample with the tiny pipeline."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from conftest import run_tool
from fff_vdi import inpaint as inpaint_cli
from fff_vdi.errors import InputError
from fff_vdi.inference import InpaintSampler, Window, WindowedInpainter, crossfade_weights, plan_windows
from fff_vdi.inference.video_io import model_frame_size, open_masks, open_video, read_rgb, write_mp4
from fff_vdi.models import decode_latents, encode_first_frame, encode_frames, load_components
from fff_vdi.utils.atomic import OUTPUT_RECORD, atomic_folder

H, W = 128, 128


@pytest.fixture(scope="module")
def components(tiny_pipeline):
    return load_components(str(tiny_pipeline))


def random_clip(num_frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(1, num_frames, 3, H, W, generator=g) * 2 - 1
    masks = torch.zeros(1, num_frames, 1, H, W)
    masks[..., 40:90, 30:100] = 1
    flows = tuple(torch.randn(1, num_frames - 1, 2, H, W, generator=g) for _ in range(2))
    return frames, masks, flows


# ----------------------------------------------------------------------------------------------
# the sampler


def published_sampling(c, frames, masks, flows, generator, num_steps):
    """The published pipeline's arithmetic for one clip (B = 1), written out step by step: batch
    doubling by broadcasting, the inversion's alphas by loop index, `.frames[0]` of the output."""
    scheduler = EulerDiscreteScheduler.from_config(c.scheduler.config)
    t = frames.shape[1]
    embeds = encode_first_frame(c.image_encoder, c.feature_extractor, frames)
    embeds = torch.cat([torch.zeros_like(embeds), embeds])
    noise = torch.randn(frames.shape, generator=generator)
    cond = encode_frames(c.vae, frames * (1 - masks) + 0.02 * noise, sample=False, scaled=False)
    cond = torch.cat([torch.zeros_like(cond), cond])
    time_ids = torch.tensor([[7 - 1, 127, 0.02]]).repeat(2, 1)
    scheduler.set_timesteps(num_steps)
    latents = torch.randn((1, t, 4, H // 8, W // 8), generator=generator) * scheduler.init_noise_sigma
    guidance = torch.linspace(1.0, 3.0, t).view(1, t, 1, 1, 1)

    for i, step_t in enumerate(reversed(scheduler.timesteps)):
        alpha, alpha_prev = scheduler.alphas_cumprod[i], scheduler.alphas_cumprod[i - 1] if i > 0 else scheduler.alphas_cumprod[0]
        model_input = torch.cat([latents] * 2) if latents.shape[0] == 1 else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, step_t), cond], dim=2)
        eps = c.unet(model_input, masks, flows, step_t, embeds, time_ids)
        pred_x0 = (latents - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
        latents = alpha**0.5 * pred_x0 + (1 - alpha) ** 0.5 * eps

    scheduler.set_timesteps(num_steps)
    for step_t in scheduler.timesteps:
        model_input = torch.cat([scheduler.scale_model_input(latents, step_t), cond], dim=2)
        uncond, positive = c.unet(model_input, masks, flows, step_t, embeds, time_ids).chunk(2)
        latents = scheduler.step(uncond + guidance * (positive - uncond), step_t, latents).prev_sample
    return decode_latents(c.vae, latents, chunk=8)[:1].clamp(-1, 1)


class RecordingUNet(torch.nn.Module):
    """Passes calls through and records the scale of the noisy latents each call sees."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.latent_std: list[float] = []

    def forward(self, sample, *args):
        self.latent_std.append(float(sample[:, :, :4].std()))
        return self.unet(sample, *args)


def test_sampler_reproduces_the_published_arithmetic(components):
    frames, masks, flows = random_clip(3)
    recorder = RecordingUNet(components.unet)
    sampler = InpaintSampler(components, num_steps=2, unet=recorder)
    calls = []
    with torch.no_grad():
        ours = sampler(frames, masks, torch.Generator().manual_seed(5), flows=flows, callback=lambda done, total: calls.append((done, total)))
        reference = published_sampling(components, frames, masks, flows, torch.Generator().manual_seed(5), num_steps=2)

    assert ours.shape == frames.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-5), float((ours - reference).abs().max())
    assert calls == [(k, 4) for k in range(1, 5)] and sampler.num_unet_calls == 4
    # scale_model_input's step index is set by the first (smallest) timestep of the inversion and
    # never advanced there: the inversion's UNet calls see unscaled latents (~ init_noise_sigma),
    # the Euler loop's first call sees unit-scale latents.
    inversion, euler = recorder.latent_std[:2], recorder.latent_std[2:]
    assert min(inversion) > 100 and 0.5 < euler[0] < 2


def test_sampler_is_deterministic_and_calls_the_unet_a_fixed_number_of_times(components):
    frames, masks, flows = random_clip(2, seed=1)
    recorder = RecordingUNet(components.unet)
    sampler = InpaintSampler(components, num_steps=1, unet=recorder)
    first = sampler(frames, masks, torch.Generator().manual_seed(0), flows=flows)
    again = sampler(frames, masks, torch.Generator().manual_seed(0), flows=flows)
    other = sampler(frames, torch.zeros_like(masks), torch.Generator().manual_seed(1), flows=flows)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(recorder.latent_std) == 3 * sampler.num_unet_calls  # whatever the masks hold


def test_sampler_runs_in_bfloat16(tiny_pipeline, components):
    """The GPU precision, on the CPU: frozen nets and UNet in bf16, latents and schedule in float32."""
    frames, masks, _ = random_clip(2, seed=2)
    half = InpaintSampler(load_components(str(tiny_pipeline), torch_dtype=torch.bfloat16), num_steps=1, raft_iters=1, dtype=torch.bfloat16)
    full = InpaintSampler(components, num_steps=1, raft_iters=1)
    out_half = half(frames, masks, torch.Generator().manual_seed(0))
    out_full = full(frames, masks, torch.Generator().manual_seed(0))
    assert out_half.dtype == torch.float32 and torch.isfinite(out_half).all()
    assert (out_half - out_full).abs().mean() < 0.1


def test_sampler_rejects_clips_it_cannot_take(components):
    sampler = InpaintSampler(components, num_steps=1)
    frames, masks, flows = random_clip(2)
    with pytest.raises(InputError, match="multiples of 8"):
        sampler(frames[..., :100], masks[..., :100], flows=tuple(f[..., :100] for f in flows))
    with pytest.raises(InputError, match=r"masks must be"):
        sampler(frames, masks[:, :1])
    with pytest.raises(InputError, match=r"flows must be"):
        sampler(frames, masks, flows=(flows[0],))


# ----------------------------------------------------------------------------------------------
# windows


def test_plan_windows_covers_the_video_and_aligns_the_last_window_to_the_end():
    assert plan_windows(80, 25, 6) == [Window(0, 25, 0), Window(19, 44, 6), Window(38, 63, 6), Window(55, 80, 8)]
    assert plan_windows(80, 48, 16) == [Window(0, 48, 0), Window(32, 80, 16)]
    assert plan_windows(20, 25, 6) == [Window(0, 20, 0)]
    assert plan_windows(10, 5, 0) == [Window(0, 5, 0), Window(5, 10, 0)]
    for bad in [(80, 1, 0), (80, 25, 25), (80, 25, -1), (1, 25, 6)]:
        with pytest.raises(InputError):
            plan_windows(*bad)
    assert np.allclose(crossfade_weights(3), [0.25, 0.5, 0.75])


class ConstantSampler:
    """Stands in for InpaintSampler: returns one constant frame value per call, records its inputs."""

    num_unet_calls = 2

    def __init__(self):
        self.inputs = []

    def __call__(self, frames, masks, generator, callback=None):
        self.inputs.append((frames.clone(), masks.clone()))
        for done in (1, 2):
            if callback is not None:
                callback(done, 2)
        return torch.full_like(frames, -0.5 + 0.5 * len(self.inputs))  # -> 0.0, 0.5, ...


def test_windows_continue_from_the_previous_result_and_crossfade():
    n, h, w = 12, 8, 8
    frames = np.full((n, h, w, 3), 255, np.uint8)  # white: 1.0 in model units
    holes = np.zeros((n, h, w), bool)
    holes[:, 2:5, 2:5] = True
    sampler = ConstantSampler()  # window outputs 0.0, 0.5, 1.0
    steps = []
    out = list(WindowedInpainter(sampler, window=6, overlap=2)(frames, holes, torch.Generator(), lambda *a: steps.append(a)))

    assert [i for i, _ in out] == list(range(n))  # windows [0, 6) [4, 10) [6, 12)
    assert len(sampler.inputs) == 3 and steps[-1] == (2, 3, 2, 2)
    for window, (known, value) in enumerate([(2, 0.0), (4, 0.5)], start=1):
        window_frames, window_masks = sampler.inputs[window]
        assert not window_masks[0, :known].any()
        assert window_masks[0, known:, 0, 2:5, 2:5].all()
        assert torch.all(window_frames[0, :known, :, 2:5, 2:5] == value)  # the current result in the hole
        assert torch.all(window_frames[0, :, :, 0, 0] == 1.0)  # the input outside it
    result = dict(out)
    expected = [0.0] * 4 + [1 / 3 * 0.5, 2 / 3 * 0.5] + [0.5 + k / 5 * 0.5 for k in range(1, 5)] + [1.0] * 2
    assert np.allclose([result[i][0, 0, 0] for i in range(n)], expected)


@pytest.mark.parametrize(
    "blend, known, overlap_values",
    [
        # window 2 starts at frame 4 with 2 overlap frames: the current result there is 0.0, its own output 0.5
        ("keep", 2, [0.0, 0.0]),
        ("handover", 1, [0.0, 1 / 2 * 0.5]),  # frame 4 known and kept; frame 5 generated by both, cross-faded
    ],
)
def test_other_blends_of_the_overlap(blend, known, overlap_values):
    n, h, w = 10, 8, 8
    frames = np.full((n, h, w, 3), 255, np.uint8)
    holes = np.zeros((n, h, w), bool)
    holes[:, 2:5, 2:5] = True
    sampler = ConstantSampler()  # windows [0, 6) [4, 10) output 0.0 and 0.5
    result = dict(WindowedInpainter(sampler, window=6, overlap=2, blend=blend)(frames, holes, torch.Generator()))
    second_masks = sampler.inputs[1][1][0, :, 0, 2:5, 2:5]
    assert not second_masks[:known].any() and second_masks[known:].all()
    assert np.allclose([result[i][0, 3, 3] for i in (4, 5)], overlap_values)
    assert np.allclose([result[i][0, 3, 3] for i in range(6, 10)], 0.5)
    with pytest.raises(InputError, match="--blend smooth: use one of crossfade, keep, handover"):
        WindowedInpainter(sampler, 6, 2, "smooth")


def test_windows_without_holes_are_not_sampled():
    frames = np.zeros((6, 8, 8, 3), np.uint8)
    holes = np.zeros((6, 8, 8), bool)
    holes[:2, 1, 1] = True
    sampler = ConstantSampler()
    out = list(WindowedInpainter(sampler, window=3, overlap=1)(frames, holes, torch.Generator()))
    assert len(sampler.inputs) == 1 and len(out) == 6
    assert np.allclose(out[-1][1], -1.0)  # the input itself


# ----------------------------------------------------------------------------------------------
# video I/O


def test_model_frame_size_keeps_the_aspect_at_the_training_pixel_count():
    assert model_frame_size(256, 512) == (256, 512)
    assert model_frame_size(240, 432) == (272, 488)
    assert model_frame_size(1920, 1080) == (480, 272)
    assert model_frame_size(64, 2000) == (128, 2024)  # RAFT's minimum side wins


def test_mask_video_and_palette_masks_are_read_as_holes(tmp_path, davis_sample):
    source = sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))[:4]
    expected = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0 for p in source])
    writer = cv2.VideoWriter(str(tmp_path / "masks.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 24, (432, 240))
    for m in expected:
        writer.write(np.repeat(m[..., None] * 255, 3, axis=2).astype(np.uint8))
    writer.release()
    from_video = np.stack(list(open_masks(tmp_path / "masks.mp4").masks((240, 432))))
    iou = (from_video & expected).sum() / (from_video | expected).sum()
    assert from_video.shape == expected.shape and iou > 0.9

    palette = tmp_path / "palette"
    palette.mkdir()
    image = cv2.imread(str(source[0]), cv2.IMREAD_GRAYSCALE)
    from PIL import Image
    indexed = Image.fromarray((image > 0).astype(np.uint8) * 2)  # object index 2
    indexed.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)  # makes it a palette image
    assert indexed.mode == "P"
    indexed.save(palette / "00000.png")
    assert np.array_equal(next(open_masks(palette).masks((240, 432))), image > 0)


def test_write_mp4_writes_whole_videos_of_any_size(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)  # odd sizes are padded
    write_mp4(tmp_path / "clip.mp4", frames, fps=7)
    video = open_video(tmp_path / "clip.mp4")
    assert (len(video), video.height, video.width, video.fps) == (5, 34, 48, 7)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


# ----------------------------------------------------------------------------------------------
# the command line


def check_output(out: Path, num_frames: int, inputs: list[np.ndarray], holes: list[np.ndarray]) -> None:
    frames = sorted((out / "frames").glob("*.png"))
    assert [f.name for f in frames] == [f"{i:05d}.png" for i in range(num_frames)]
    for path, original, hole in zip(frames, inputs, holes):
        result = read_rgb(path)
        assert result.shape == original.shape
        assert np.array_equal(result[~hole], original[~hole])  # bit-identical outside the hole
    for name, width in (("inpainted.mp4", inputs[0].shape[1]), ("comparison.mp4", 2 * inputs[0].shape[1])):
        video = cv2.VideoCapture(str(out / name))
        count = 0
        while True:
            ok, frame = video.read()
            if not ok:
                break
            count += 1
            assert frame.shape == (inputs[0].shape[0], width, 3)
        video.release()
        assert count == num_frames, name
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_inpaint_davis_frames_in_two_windows(tiny_pipeline, davis_sample, tmp_path):
    out = tmp_path / "out"
    run_tool("-m", "fff_vdi.inpaint", "--video", str(davis_sample), "--video-id", "bmx-trees", "--model", str(tiny_pipeline),
             "--out", str(out), "--steps", "1", "--height", "128", "--width", "128", "--window", "44", "--overlap", "8",
             "--raft-iters", "1", "--device", "cpu")
    frames = sorted((davis_sample / "JPEGImages" / "bmx-trees").glob("*.jpg"))
    masks = sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))
    assert len(frames) == 80
    check_output(out, 80, [read_rgb(f) for f in frames], [cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 0 for m in masks])


@pytest.mark.slow
def test_inpaint_an_mp4(tiny_pipeline, davis_sample, tmp_path):
    num_frames = 8
    frames = [read_rgb(p) for p in sorted((davis_sample / "JPEGImages" / "bmx-trees").glob("*.jpg"))[:num_frames]]
    writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 12, (432, 240))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))[:num_frames]:
        shutil.copy(p, masks / p.name)

    out = tmp_path / "out"
    run_tool("-m", "fff_vdi.inpaint", "--video", str(tmp_path / "clip.mp4"), "--masks", str(masks), "--model", str(tiny_pipeline),
             "--out", str(out), "--steps", "1", "--width", "224", "--window", "6", "--overlap", "2", "--raft-iters", "1",
             "--mask-dilation", "2", "--device", "cpu")
    decoded = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    inputs = [cv2.cvtColor(decoded.read()[1], cv2.COLOR_BGR2RGB) for _ in range(num_frames)]
    decoded.release()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    holes = [cv2.dilate((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8), kernel) > 0 for p in sorted(masks.iterdir())]
    check_output(out, num_frames, inputs, holes)
    assert cv2.VideoCapture(str(out / "inpainted.mp4")).get(cv2.CAP_PROP_FPS) == 12


@pytest.fixture
def small_video(tmp_path) -> tuple[Path, Path]:
    """3 frames of 64x96 with one-hole masks: enough for the checks that run before any model."""
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir()
    masks.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i:05d}.png"), np.full((64, 96, 3), 40 * i, np.uint8))
        hole = np.zeros((64, 96), np.uint8)
        hole[10:20, 10:30] = 255
        cv2.imwrite(str(masks / f"{i:05d}.png"), hole)
    return frames, masks


def run_cli(capsys, tiny_pipeline, video, masks, out, *extra) -> tuple[int, str]:
    code = inpaint_cli.main(["--video", str(video), "--masks", str(masks), "--model", str(tiny_pipeline), "--out", str(out), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "break_input, expected",
    [
        (lambda f, m: (m / "00002.png").unlink(), r"has 3 frames but .*masks has 2 masks \(no mask for frames 00002\)"),
        (lambda f, m: cv2.imwrite(str(m / "00001.png"), np.zeros((32, 96), np.uint8)), r"masks/00001.png is 96x32 \(WxH\) but its video frame is 96x64"),
        (lambda f, m: [cv2.imwrite(str(p), np.zeros((64, 96), np.uint8)) for p in m.iterdir()], r"no hole in any frame"),
        (lambda f, m: (f / "00001.png").write_bytes(b"not a png"), r"frames/00001.png: cannot be read as an image"),
        (lambda f, m: shutil.rmtree(f), r"--video .*frames: no such file or folder"),
    ],
    ids=["missing-mask", "mask-size", "empty-masks", "corrupt-frame", "no-video"],
)
def test_inpaint_rejects_bad_input_and_writes_nothing(capsys, tiny_pipeline, small_video, tmp_path, break_input, expected):
    frames, masks = small_video
    break_input(frames, masks)
    code, err = run_cli(capsys, tiny_pipeline, frames, masks, tmp_path / "out")
    assert code == 2
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_inpaint_refuses_to_replace_an_output_and_bad_sizes(capsys, tiny_pipeline, small_video, tmp_path):
    frames, masks = small_video
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, tiny_pipeline, frames, masks, tmp_path / "out")
    assert code == 2 and "exists and is not empty: choose another folder or pass --overwrite" in err
    code, err = run_cli(capsys, tiny_pipeline, frames, masks, tmp_path / "out", "--overwrite")
    assert code == 2 and "never replaced" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, tiny_pipeline, frames, masks, tmp_path / "out2", "--height", "100", "--width", "128")
    assert code == 2 and "--height 100" in err


def test_outputs_appear_whole_or_not_at_all(tmp_path):
    def fail_midway(tmp: Path) -> None:
        (tmp / "frames").mkdir()
        (tmp / "frames" / "00000.png").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError), atomic_folder(tmp_path / "out", "test") as tmp:
        fail_midway(tmp)
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out", "test") as tmp:
        (tmp / "a").write_text("1")
    with atomic_folder(tmp_path / "out", "test", overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow
def test_inpaint_takes_one_mask_image_for_every_frame(capsys, tiny_pipeline, small_video, tmp_path):
    """A logo or watermark: one mask image, the same hole in every frame."""
    frames, _ = small_video
    hole = np.zeros((64, 96), np.uint8)
    hole[5:15, 60:90] = 255
    cv2.imwrite(str(tmp_path / "logo.png"), hole)
    code, err = run_cli(capsys, tiny_pipeline, frames, tmp_path / "logo.png", tmp_path / "out", "--steps", "1", "--raft-iters", "1",
                        "--height", "128", "--width", "128", "--device", "cpu")
    assert code == 0, err
    check_output(tmp_path / "out", 3, [read_rgb(p) for p in sorted(frames.iterdir())], [hole > 0] * 3)
    assert len(open_masks(tmp_path / "logo.png", num_frames=5)) == 5
    with pytest.raises(InputError, match="one mask image is not accepted here"):
        open_masks(tmp_path / "logo.png")
