"""fff_vdi.data.synthetic: layout, determinism, moving content, palette masks, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fff_vdi.data.synthetic import Scene, write_synthetic_videos
from fff_vdi.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_names(tmp_path):
    root = write_synthetic_videos(tmp_path / "a", 2, 3, 24, 32)
    assert sorted(p.name for p in (root / "JPEGImages").iterdir()) == ["synth0000", "synth0001"]
    assert sorted(p.name for p in (root / "JPEGImages/synth0001").iterdir()) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert sorted(p.name for p in (root / "Annotations/synth0001").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    six_fps = write_synthetic_videos(tmp_path / "b", 1, 3, 24, 32, fps_layout="youtube_vos_6fps",
                                     with_annotations=False)
    assert sorted(p.name for p in (six_fps / "JPEGImages/synth0000").iterdir()) == [
        "00000.jpg", "00005.jpg", "00010.jpg"]
    assert not (six_fps / "Annotations").exists()
    frame = Image.open(root / "JPEGImages/synth0000/00001.jpg")
    assert (frame.format, frame.mode, frame.size) == ("JPEG", "RGB", (32, 24))


def test_same_seed_same_bytes_with_any_workers_other_seed_other_bytes(tmp_path):
    a = tree_bytes(write_synthetic_videos(tmp_path / "a", 2, 4, 24, 32, seed=7))
    b = tree_bytes(write_synthetic_videos(tmp_path / "b", 2, 4, 24, 32, seed=7, workers=2))
    c = tree_bytes(write_synthetic_videos(tmp_path / "c", 2, 4, 24, 32, seed=8))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_scene_moves_and_masks_follow_the_objects():
    scene = Scene.random(np.random.default_rng(0), 20, 96, 128)
    frames, labels = zip(*(scene.render(t) for t in range(20)))
    assert all(f.shape == (96, 128, 3) and f.dtype == np.uint8 for f in frames)
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[2:]))
    object_ids = set(np.unique(np.stack(labels))) - {0}
    assert object_ids in ({1}, {2}, {1, 2})
    # The first object's centroid moves at its constant velocity while fully in view (frames 4-14 here).
    shape = scene.shapes[0]
    visible = [t for t, l in enumerate(labels) if (l == shape.label).sum() == shape.inside.sum()]
    assert len(visible) == 11
    centroids = np.stack([np.argwhere(labels[t] == shape.label).mean(axis=0) for t in visible])
    slope = np.polyfit(visible, centroids, 1)[0]
    assert np.allclose(slope, shape.velocity, atol=0.1)


def test_masks_are_palette_pngs_with_object_ids(tmp_path):
    root = write_synthetic_videos(tmp_path, 1, 2, 48, 64, seed=2)
    mask = Image.open(root / "Annotations/synth0000/00000.png")
    assert (mask.format, mask.mode, mask.size) == ("PNG", "P", (64, 48))
    assert mask.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(InputError, match="fps_layout='30fps' is unknown"):
        write_synthetic_videos(tmp_path, 1, 1, 8, 8, fps_layout="30fps")
    with pytest.raises(InputError, match="must be >= 1, got 1, 0, 8, 8"):
        write_synthetic_videos(tmp_path, 1, 0, 8, 8)


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fff_vdi.data.synthetic", "--out", str(tmp_path), "--videos", "1",
                             "--frames", "2", "--height", "24", "--width", "32"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 videos of 2 frames (32x24)" in result.stdout
    assert (tmp_path / "JPEGImages/synth0000/00001.jpg").is_file()
    assert (tmp_path / "Annotations/synth0000/00001.png").is_file()
