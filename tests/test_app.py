"""The web app's logic without a browser (fff_vdi/app/session.py, media.py) and the page's wiring:
uploads that cannot be used, clicks, masks, previews, downloads, and one queue for the long jobs.
tests/test_app_browser.py drives the whole page in Chromium."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from fff_vdi.app.__main__ import EXAMPLE
from fff_vdi.app.media import OBJECT_COLOURS, draw_clicks, overlay_labels, zip_files
from fff_vdi.app.session import Models, Session
from fff_vdi.errors import InputError
from fff_vdi.inference.segmentation import Click, VideoSegmenter
from fff_vdi.inference.video_io import open_video, write_mp4
from fff_vdi.models.sam2 import load_sam2


@pytest.fixture(scope="module")
def models(tiny_sam2):
    """SAM2 only: these tests do not inpaint."""
    return Models(VideoSegmenter(*load_sam2(str(tiny_sam2))), components=None, inference=None, max_frames=20)


@pytest.fixture
def session(tmp_path) -> Session:
    session = Session(tmp_path / "tab")
    session.load(EXAMPLE, max_frames=20)
    return session


def test_the_example_loads_whole(session):
    assert session.video.frames.shape == (8, 180, 320, 3) and session.video.fps == 12
    assert session.describe_clicks().startswith("No clicks yet")


@pytest.mark.parametrize(
    "make, max_frames, expected",
    [
        (lambda p: p.write_bytes(b"not a video"), 20, "OpenCV cannot open this video"),
        (lambda p: write_mp4(p, np.zeros((9, 32, 32, 3), np.uint8), 5), 8, "has 9 frames; this app takes at most 8"),
        (lambda p: write_mp4(p, np.zeros((1, 32, 32, 3), np.uint8), 5), 8, "has 1 frame: inpainting needs at least 2"),
    ],
    ids=["not-a-video", "too-long", "one-frame"],
)
def test_unusable_uploads_are_refused_with_the_reason(tmp_path, make, max_frames, expected):
    upload = tmp_path / "upload.mp4"
    make(upload)
    with pytest.raises(InputError, match=expected):
        Session(tmp_path / "tab").load(upload, max_frames)
    with pytest.raises(InputError, match="no video"):
        Session(tmp_path / "tab").load(None, max_frames)


def test_clicks_are_checked_grouped_by_object_and_drawn_on_their_frame(session):
    session.add_click(10, 20, 0, 2, True)
    session.add_click(30, 40, 3, 1, True)
    session.add_click(50, 60, 3, 1, False)
    with pytest.raises(InputError, match=r"outside the 320x180 frame"):
        session.add_click(320, 10, 0, 1, True)
    with pytest.raises(InputError, match=r"frame 8 is not in the video"):
        session.add_click(10, 10, 8, 1, True)
    assert session.objects() == [[Click(30, 40, True, 3), Click(50, 60, False, 3)], [Click(10, 20, True, 0)]]
    assert "object 1: - (50, 60) on frame 3" in session.describe_clicks()
    frame0, frame3 = session.frame_view(0), session.frame_view(3)
    assert not np.array_equal(frame0[20, 10], session.video.frames[0][20, 10])  # marker drawn
    assert np.array_equal(frame0[40, 30], session.video.frames[0][40, 30])  # the frame-3 click is not on frame 0
    assert not np.array_equal(frame3[40, 30], session.video.frames[3][40, 30])
    session.clear_clicks()
    assert session.clicks == [] and np.array_equal(session.frame_view(3), session.video.frames[3])


def test_masks_follow_the_clicks_and_are_made_again_after_a_new_click(session, models):
    with pytest.raises(InputError, match="make the mask first"):
        session.inpaint(models, 1, 0, lambda done, what: None)
    session.add_click(120, 72, 0, 1, True)
    progress = []
    preview = session.segment(models, 2, lambda done, what: progress.append(done))
    assert session.labels.shape == (8, 180, 320) and session.labels.any()
    assert progress[-1] == 1.0 and progress == sorted(progress)
    video = open_video(preview)
    assert (len(video), video.height, video.width) == (8, 180, 320)
    shown = session.frame_view(1)
    inside = session.labels[1] > 0
    assert not np.array_equal(shown[inside], session.video.frames[1][inside])  # the mask is drawn over the frame
    session.add_click(10, 10, 5, 1, False)
    assert session.labels is None  # stale: the mask must be made again


def test_a_new_job_replaces_the_tabs_previous_one(session, models):
    session.add_click(120, 72, 0, 1, True)
    first = session.segment(models, 0, lambda done, what: None)
    second = session.segment(models, 0, lambda done, what: None)
    assert second.exists() and not first.parent.exists()


def test_overlay_and_zip(tmp_path):
    rgb = np.full((20, 20, 3), 100, np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[5:10, 5:10] = 2
    tinted = overlay_labels(rgb, labels)
    assert np.array_equal(tinted[15:, 15:], rgb[15:, 15:])  # far from the object: untouched
    centre = tinted[7, 7].astype(int)
    assert np.abs(centre - np.array(OBJECT_COLOURS[1])).sum() < np.abs(rgb[7, 7].astype(int) - np.array(OBJECT_COLOURS[1])).sum()
    marked = draw_clicks(rgb, [(1, Click(10, 10, True, 0))])
    assert not np.array_equal(marked[10, 10], rgb[10, 10])
    files = []
    for name in ("b.png", "a.png"):
        (tmp_path / name).write_bytes(name.encode())
        files.append(tmp_path / name)
    with zipfile.ZipFile(zip_files(tmp_path / "out.zip", files)) as archive:
        assert archive.namelist() == ["b.png", "a.png"] and archive.read("a.png") == b"a.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "out.zip"]


def test_the_long_jobs_share_one_queue_slot(models, tmp_path):
    """SAM2 and inpainting run one at a time across all users (a second user's job waits in line)."""
    import argparse

    from fff_vdi.app.ui import GPU_QUEUE, build_demo

    inference = argparse.Namespace(mask_dilation=0, steps=1, seed=0)
    demo = build_demo(Models(models.segmenter, None, inference, 20), tmp_path, EXAMPLE)
    long_jobs = [fn for fn in demo.fns.values() if fn.name in ("segment", "inpaint")]
    assert len(long_jobs) == 2
    assert all(fn.concurrency_id == GPU_QUEUE and fn.concurrency_limit == 1 for fn in long_jobs)
