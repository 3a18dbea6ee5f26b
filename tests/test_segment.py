"""`python -m fff_vdi.segment` on a tiny random SAM2 (tools/make_tiny_sam2.py, loaded through the real
loading code): one mask per frame at the video's size, propagation to every frame against the
documented transformers loop, dilation, several objects, and one clear line for bad clicks or
missing weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_tool
from fff_vdi import segment as segment_cli
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.inference.segmentation import Click, dilate_labels, label_palette, parse_click
from fff_vdi.inference.video_io import open_video
from fff_vdi.models.sam2 import load_sam2

NUM_FRAMES, HEIGHT, WIDTH = 8, 96, 160


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """8 frames of 160x96 with moving textured shapes (a folder of JPEGs)."""
    root = write_synthetic_videos(tmp_path_factory.mktemp("segment_video"), 1, NUM_FRAMES, HEIGHT, WIDTH, seed=5, with_annotations=False)
    return root / "JPEGImages" / "synth0000"


@pytest.fixture(scope="module")
def sam2(tiny_sam2):
    return load_sam2(str(tiny_sam2))


def run_segment(capsys, video: Path, out: Path, sam: Path, *points: list[str], extra: tuple[str, ...] = ()) -> tuple[int, str]:
    argv = ["--video", str(video), "--out", str(out), "--sam", str(sam), "--device", "cpu", *extra]
    for clicks in points:
        argv += ["--points", *clicks]
    code = segment_cli.main(argv)
    return code, capsys.readouterr().err


def read_labels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def documented_propagation(sam2, frames: list[np.ndarray], click: Click) -> np.ndarray:
    """The transformers documentation's loop for one object, written out: clicks on one frame, the
    model on that frame, propagation forward from it, then backward from it."""
    model, processor = sam2
    session = processor.init_video_session(video=frames, inference_device="cpu")
    processor.add_inputs_to_inference_session(inference_session=session, frame_idx=click.frame, obj_ids=1,
                                              input_points=[[[[click.x, click.y]]]], input_labels=[[[1]]])
    model(inference_session=session, frame_idx=click.frame)
    masks = {}
    for reverse in (False, True):
        for output in model.propagate_in_video_iterator(session, start_frame_idx=click.frame, reverse=reverse):
            masks[output.frame_idx] = processor.post_process_masks([output.pred_masks], [[HEIGHT, WIDTH]], binarize=True)[0][0, 0].numpy()
    return np.stack([masks[i] for i in range(len(frames))])


def test_one_mask_per_frame_at_the_video_size_named_like_the_frames(capsys, video, tiny_sam2, tmp_path):
    code, err = run_segment(capsys, video, tmp_path / "masks", tiny_sam2, ["80,50"])
    assert code == 0, err
    frames = sorted(video.glob("*.jpg"))
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert [m.name for m in masks] == [f.with_suffix(".png").name for f in frames]
    for mask in masks:
        with Image.open(mask) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "P"
            assert image.getpalette()[:9] == label_palette()[:9]
    labels = read_labels(tmp_path / "masks")
    assert set(np.unique(labels)) <= {0, 1} and labels.any()
    assert [p.name for p in tmp_path.iterdir()] == ["masks"]  # no temporary folder left


@pytest.mark.parametrize("clicked_frame", [0, 5])
def test_masks_propagate_to_every_frame_as_sam2_documents(capsys, video, sam2, tiny_sam2, tmp_path, clicked_frame):
    """Clicked on frame 5 of 8, frames 0-4 get their masks from the backward pass."""
    click = Click(60, 40, True, clicked_frame)
    frames = list(open_video(video).frames())
    expected = documented_propagation(sam2, frames, click)
    assert expected[:clicked_frame].any() or clicked_frame == 0  # the reference has something to find before the click
    assert len({m.tobytes() for m in expected}) > 1  # each frame's own mask, not one mask copied

    code, err = run_segment(capsys, video, tmp_path / "masks", tiny_sam2, [str(click)])
    assert code == 0, err
    assert np.array_equal(read_labels(tmp_path / "masks") > 0, expected)


def test_dilation_grows_each_object_into_the_background(capsys, video, tiny_sam2, tmp_path):
    assert run_segment(capsys, video, tmp_path / "plain", tiny_sam2, ["80,50"])[0] == 0
    assert run_segment(capsys, video, tmp_path / "grown", tiny_sam2, ["80,50"], extra=("--dilation", "3"))[0] == 0
    plain, grown = read_labels(tmp_path / "plain"), read_labels(tmp_path / "grown")
    assert plain.any() and not plain.all()
    assert np.all(grown[plain > 0] == plain[plain > 0])  # nothing lost
    assert (grown > 0).sum() > (plain > 0).sum()
    # At most 3 pixels out: every grown pixel has an original one within the 7x7 square around it.
    for before, after in zip(plain > 0, grown > 0):
        padded = np.pad(before, 3)
        near = np.zeros_like(before)
        for dy in range(7):
            for dx in range(7):
                near |= padded[dy:dy + HEIGHT, dx:dx + WIDTH]
        assert not (after & ~near).any()


def test_dilated_objects_do_not_overwrite_each_other():
    labels = np.zeros((1, 9, 9), np.uint8)
    labels[0, 4, 2], labels[0, 4, 5] = 1, 2
    grown = dilate_labels(labels, 2)
    assert grown[0, 4, 2] == 1 and grown[0, 4, 5] == 2
    assert grown[0, 4, 3] == 1 and grown[0, 4, 6] == 2  # each grows into the background only


def test_several_objects_clicked_on_different_frames(capsys, video, sam2, tiny_sam2, tmp_path):
    """Object 2 is first clicked on frame 3: it gets its own pass and still covers frames 0-2."""
    code, err = run_segment(capsys, video, tmp_path / "masks", tiny_sam2, ["80,50", "10,10,0"], ["120,30@3"])
    assert code == 0, err
    labels = read_labels(tmp_path / "masks")
    assert set(np.unique(labels)) == {0, 1, 2}
    frames = list(open_video(video).frames())
    second = documented_propagation(sam2, frames, Click(120, 30, True, 3))
    assert np.array_equal(labels == 2, second)  # the higher id wins where both are
    assert (labels[:3] == 2).any()


@pytest.mark.parametrize(
    "points, expected",
    [
        (["80;50"], r"--points '80;50': expected x,y\[,label\]\[@frame\]"),
        (["80,50,2"], r"--points '80,50,2': expected"),
        (["160,50"], r"--points 160,50,1@0 \(object 1\): \(160, 50\) is outside the 160x96 frame"),
        (["80,-1"], r"is outside the 160x96 frame"),
        (["80,50@8"], r"--points 80,50,1@8 \(object 1\): frame 8 is not in the video \(frames 0 to 7\)"),
        (["80,50,0"], r"object 1 has only negative clicks"),
    ],
    ids=["syntax", "label", "x-outside", "y-outside", "frame-beyond", "only-negative"],
)
def test_bad_clicks_get_one_clear_line_and_no_output(capsys, video, tiny_sam2, tmp_path, points, expected):
    code, err = run_segment(capsys, video, tmp_path / "masks", tiny_sam2, points)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and re.search(expected, err), err
    assert not list(tmp_path.iterdir())


def test_missing_weights_say_how_to_download_them(video, tmp_path):
    proc = run_tool("-m", "fff_vdi.segment", "--video", str(video), "--points", "80,50", "--out", str(tmp_path / "masks"),
                    "--device", "cpu", check=False, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "huggingface-cli download facebook/sam2.1-hiera-tiny" in lines[0] and "--sam FOLDER" in lines[0], proc.stderr
    assert not (tmp_path / "masks").exists()


def test_click_syntax():
    assert parse_click("12.5, 7") == Click(12.5, 7.0, True, 0)
    assert parse_click("3,4,0@12") == Click(3.0, 4.0, False, 12)
    assert parse_click("3,4@2") == Click(3.0, 4.0, True, 2)
    assert parse_click(str(Click(3.0, 4.0, False, 12))) == Click(3.0, 4.0, False, 12)


def test_a_random_sam2_of_released_size_builds_on_the_meta_device():
    """The benchmark's architectures (hiera-tiny 39M, hiera-small 46M parameters, as released)."""
    from fff_vdi.models.sam2 import build_random_sam2

    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_random_sam2(name, device="meta")[0].parameters())
                  for name in ("sam2.1-hiera-tiny", "sam2.1-hiera-small")}
    assert 38e6 < counts["sam2.1-hiera-tiny"] < 40e6 and 45e6 < counts["sam2.1-hiera-small"] < 47e6, counts
