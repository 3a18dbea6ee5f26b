"""Metrics against independent implementations (scikit-image, direct formulas) and
`python -m fff_vdi.evaluate` end to end on the DAVIS sample."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import run_tool
from fff_vdi.eval import (
    MAX_PSNR,
    I3DFeatures,
    frechet_distance,
    hole_ssim_per_frame,
    i3d_feature,
    load_i3d,
    masked_psnr_per_frame,
    psnr_per_frame,
    ssim_per_frame,
    warping_error_per_pair,
    warping_error_per_pair_dis,
)
from fff_vdi.evaluate import main as evaluate_main
from fff_vdi.inference.video_io import read_rgb


@pytest.fixture(scope="module")
def davis_frames(davis_sample) -> np.ndarray:
    return np.stack([read_rgb(p) for p in sorted((davis_sample / "JPEGImages" / "bmx-trees").glob("*.jpg"))[:6]])


def degraded(frames: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = frames.astype(np.int16) + rng.integers(-25, 26, frames.shape)
    noisy[:, 50:120, 100:200] = 128  # a badly filled "hole"
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_psnr_and_ssim_match_scikit_image(davis_frames):
    pred, gt = degraded(davis_frames[:3]), davis_frames[:3]
    for crop in (np.s_[:], np.s_[:, 3:200, 5:331]):  # the protocol's 432x240 and an odd size
        p, g = pred[crop], gt[crop]
        ours_psnr, ours_ssim = psnr_per_frame(p, g), ssim_per_frame(p, g)
        for k in range(len(g)):
            assert ours_psnr[k] == pytest.approx(peak_signal_noise_ratio(g[k], p[k], data_range=255), abs=1e-9)
            reference = structural_similarity(g[k], p[k], channel_axis=-1, win_size=65, data_range=255)
            assert ours_ssim[k] == pytest.approx(reference, abs=1e-9)
    assert np.all(psnr_per_frame(gt, gt) == MAX_PSNR) and np.allclose(ssim_per_frame(gt, gt), 1.0)


def test_masked_psnr_uses_only_hole_pixels(davis_frames):
    gt = davis_frames[:2]
    pred = gt.copy()
    holes = np.zeros(gt.shape[:3], bool)
    holes[0, 10:20, 10:30] = True
    pred[0, 10:20, 10:30] = np.clip(gt[0, 10:20, 10:30].astype(int) + 10, 0, 255)
    pred[0, 100:] = 0  # outside the hole: ignored
    squared = (pred[0, 10:20, 10:30].astype(float) - gt[0, 10:20, 10:30]) ** 2
    psnr = masked_psnr_per_frame(pred, gt, holes)
    assert psnr[0] == pytest.approx(10 * np.log10(255**2 / squared.mean()))
    assert np.isnan(psnr[1])


def test_hole_ssim_weights_windows_by_their_hole_share(davis_frames):
    gt = np.ascontiguousarray(davis_frames[:3, 40:140, 100:260])
    pred = degraded(gt)
    everywhere = np.ones(gt.shape[:3], bool)
    assert np.allclose(hole_ssim_per_frame(pred, gt, everywhere), ssim_per_frame(pred, gt))  # one weight for all
    holes = np.zeros(gt.shape[:3], bool)
    holes[:, 30:70, 40:120] = True
    composite = np.where(holes[..., None], pred, gt)  # the ground truth outside the hole
    inside = hole_ssim_per_frame(composite, gt, holes)
    assert np.all(inside < ssim_per_frame(composite, gt))  # untouched windows no longer dilute the hole
    assert np.allclose(hole_ssim_per_frame(gt, gt, holes), 1.0)
    holes[1] = False
    assert np.isnan(hole_ssim_per_frame(composite, gt, holes)[1])


class ConstantFlow(torch.nn.Module):
    """Stands in for RAFT: the same flow everywhere, forward = +flow, backward = -flow."""

    def __init__(self, dx: float):
        super().__init__()
        self.dx = dx
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image1, image2, iters):
        flow = torch.zeros(image1.shape[0], 2, *image1.shape[-2:])
        # The pairs arrive as [forward pairs; backward pairs].
        flow[: len(flow) // 2, 0], flow[len(flow) // 2 :, 0] = self.dx, -self.dx
        return flow


def test_warping_error_follows_its_definition():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (140, 170, 3), dtype=np.uint8)
    # Content moving right by 1 px per frame: frame t+1 at x+1 is frame t at x.
    moving = np.stack([base[:, 10 - t : 160 - t] for t in range(4)])
    assert np.allclose(warping_error_per_pair(moving, moving, ConstantFlow(1.0)), 0.0)

    # Zero flow: every pixel is consistent, the error is the plain frame difference.
    pred = rng.integers(0, 256, (3, 130, 140, 3), dtype=np.uint8)
    errors = warping_error_per_pair(pred, pred, ConstantFlow(0.0))
    direct = [((pred[t + 1] / 255.0 - pred[t] / 255.0) ** 2).mean() for t in range(2)]
    assert np.allclose(errors, direct)


def test_warping_error_with_dis_flows_sees_motion(davis_frames):
    # The DAVIS frame sliding right by 2 px per frame: DIS finds the motion, so a prediction that
    # moves with it has almost no warping error, and one that flickers has a large one.
    base = davis_frames[0]
    moving = np.stack([base[:, 20 - 2 * t : 400 - 2 * t] for t in range(4)])
    along = warping_error_per_pair_dis(moving, moving)
    flicker = moving.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(int) + 40, 0, 255)
    assert along.shape == (3,) and along.max() < 2e-3
    assert warping_error_per_pair_dis(flicker, moving).min() > 10 * along.max()


def test_frechet_distance_matches_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(loc=0.5, scale=2.0, size=(40, 5))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    assert frechet_distance(a, b) == pytest.approx(expected)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_i3d_loads_pytorch_i3d_state_dicts_and_torchscript(tmp_path):
    torch.manual_seed(0)
    model = I3DFeatures().eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.logits.conv3d.weight"] = torch.zeros(400, 1024, 1, 1, 1)  # the classifier, not part of the feature
    state["module.logits.conv3d.bias"] = torch.zeros(400)
    torch.save(state, tmp_path / "i3d.pt")
    video = np.random.default_rng(0).integers(0, 256, (4, 32, 40, 3), dtype=np.uint8)
    expected = i3d_feature(model, video)
    assert expected.shape == (1024,)
    assert np.allclose(i3d_feature(load_i3d(tmp_path / "i3d.pt"), video), expected, atol=1e-6)

    clip = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 255
    torch.jit.save(torch.jit.trace(model, clip), tmp_path / "i3d_script.pt")
    assert np.allclose(i3d_feature(load_i3d(tmp_path / "i3d_script.pt"), video), expected, atol=1e-5)

    del state["module.Mixed_5c.b0.conv3d.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(Exception, match=r"missing \(1\): Mixed_5c\.b0\.conv3d\.weight"):
        load_i3d(tmp_path / "broken.pt")


def write_frames(folder: Path, frames: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png")


def test_evaluate_cli_on_the_davis_sample(tiny_pipeline, davis_sample, davis_frames, tmp_path):
    gt_frames = davis_frames
    # Two "videos" of 3 frames each, in dataset layouts, the predictions degraded.
    for name, part in (("first", slice(0, 3)), ("second", slice(3, 6))):
        write_frames(tmp_path / "gt" / "JPEGImages" / name, gt_frames[part])
        write_frames(tmp_path / "pred" / name, degraded(gt_frames[part]))
        masks = tmp_path / "masks" / "Masks" / name
        masks.mkdir(parents=True)
        for p in sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))[part]:
            shutil.copy(p, masks / p.name)
    torch.manual_seed(0)
    torch.save(I3DFeatures().state_dict(), tmp_path / "i3d.pt")

    run_tool("-m", "fff_vdi.evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--masks", str(tmp_path / "masks"),
             "--size", "224x128", "--raft", str(tiny_pipeline), "--raft-iters", "1", "--i3d", str(tmp_path / "i3d.pt"),
             "--json", str(tmp_path / "scores.json"), "--device", "cpu")
    scores = json.loads((tmp_path / "scores.json").read_text())

    def resized(frames):
        return np.stack([np.asarray(Image.fromarray(f).resize((224, 128), Image.BICUBIC)) for f in frames])

    pred, gt = resized(degraded(gt_frames[:3])), resized(gt_frames[:3])
    pred = np.concatenate([pred, resized(degraded(gt_frames[3:]))])
    gt = np.concatenate([gt, resized(gt_frames[3:])])
    psnr = [peak_signal_noise_ratio(g, p, data_range=255) for p, g in zip(pred, gt)]
    ssim = [structural_similarity(g, p, channel_axis=-1, win_size=65, data_range=255)
            for p, g in zip(pred, gt)]
    summary = scores["summary"]
    assert scores["size"] == [224, 128] and summary["num_videos"] == 2 and summary["num_frames"] == 6
    assert summary["psnr"] == pytest.approx(np.mean(psnr), abs=1e-9) and summary["ssim"] == pytest.approx(np.mean(ssim), abs=1e-9)
    assert np.isfinite(summary["ewarp_x1e3"]) and np.isfinite(summary["vfid"]) and np.isfinite(summary["psnr_hole"])
    holes = [np.asarray(Image.open(m).resize((224, 128), Image.NEAREST)) > 0
             for m in sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))[:6]]
    hole_psnr = [10 * np.log10(255**2 / ((p[h].astype(float) - g[h]) ** 2).mean()) for p, g, h in zip(pred, gt, holes)]
    assert summary["psnr_hole"] == pytest.approx(np.mean(hole_psnr), abs=1e-9)
    assert scores["skipped"] == {} and set(scores["videos"]) == {"first", "second"}


def test_evaluate_reports_what_it_skips_and_why(davis_frames, tmp_path, capsys):
    write_frames(tmp_path / "gt", davis_frames[:2])
    write_frames(tmp_path / "pred", davis_frames[:2])
    assert evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["summary"]["psnr"] == MAX_PSNR and scores["summary"]["ssim"] == pytest.approx(1.0)
    assert "--raft" in scores["skipped"]["ewarp_x1e3"] and "--i3d" in scores["skipped"]["vfid"]
    assert "skipped vfid" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda root: (root / "pred" / "00001.png").unlink(), r"has 1 frames but .* has 2"),
        (lambda root: (root / "pred").rename(root / "elsewhere"), r"--pred .*pred: no such file or folder"),
    ],
    ids=["frame-count", "missing-pred"],
)
def test_evaluate_rejects_mismatched_input(davis_frames, tmp_path, capsys, setup, expected):
    write_frames(tmp_path / "gt", davis_frames[:2])
    write_frames(tmp_path / "pred", davis_frames[:2])
    setup(tmp_path)
    assert evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    assert re.search(expected, capsys.readouterr().err)


def test_evaluate_scores_only_what_is_comparable_with_the_ground_truth(davis_frames, davis_sample, tmp_path, capsys):
    """Issue 17.3: a prediction or masks of another aspect ratio were resized to --size and scored without
    a word. Another size of the same aspect ratio is what the protocol resizes (with a warning)."""
    def resized(frames, width, height, kind=Image.BICUBIC):
        return np.stack([np.asarray(Image.fromarray(f).resize((width, height), kind)) for f in frames])

    gt, masks = tmp_path / "gt", tmp_path / "masks"
    write_frames(gt, davis_frames[:2])  # 432x240
    holes = [np.asarray(Image.open(p)) for p in sorted((davis_sample / "Masks" / "bmx-trees").glob("*.png"))[:2]]
    write_frames(masks, (np.stack(holes) > 0).astype(np.uint8) * 255)
    write_frames(tmp_path / "narrow", resized(davis_frames[:2], 120, 300))
    assert evaluate_main(["--pred", str(tmp_path / "narrow"), "--gt", str(gt)]) == 2
    assert re.search(r"--pred .*narrow is 120x300 but the ground truth .*gt is 432x240 \(WxH\), another aspect ratio",
                     capsys.readouterr().err)
    write_frames(tmp_path / "wide_masks", resized((np.stack(holes) > 0).astype(np.uint8) * 255, 300, 120, Image.NEAREST))
    assert evaluate_main(["--pred", str(gt), "--gt", str(gt), "--masks", str(tmp_path / "wide_masks")]) == 2
    assert re.search(r"--masks .*wide_masks is 300x120 but the ground truth .*gt is 432x240", capsys.readouterr().err)

    write_frames(tmp_path / "double", resized(davis_frames[:2], 864, 480))
    assert evaluate_main(["--pred", str(tmp_path / "double"), "--gt", str(gt), "--masks", str(masks),
                          "--json", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: video 'gt': --pred" in err and "both are resized to --size 432x240" in err
    scores = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert 30 < scores["psnr"] < 100 and scores["psnr_hole"] is not None


def test_evaluate_matches_collections_by_name(davis_frames, tmp_path, capsys):
    for name in ("a", "b"):
        write_frames(tmp_path / "gt" / name, davis_frames[:2])
    for name in ("a", "c"):
        write_frames(tmp_path / "pred" / name, davis_frames[:2])
    assert evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    assert "predictions missing for: b" in capsys.readouterr().err
    # One video on each side pairs up whatever the names (an inpaint output against a dataset root).
    assert evaluate_main(["--pred", str(tmp_path / "pred" / "c"), "--gt", str(tmp_path / "gt" / "a")]) == 0
