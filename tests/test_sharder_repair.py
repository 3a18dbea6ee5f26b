"""Issue 17, point 8: `tools/shard_ytvos.py --repair DIR` rewrites exactly the shards that --verify finds
damaged, from the source, byte-identical to the first run; a source that changed since is refused and
nothing is changed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.run import run_sharding

REPO = Path(__file__).resolve().parents[1]


def tool(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/shard_ytvos.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """10 videos with masks; synth0003 (train) has no usable frame, so the first run skipped it."""
    src = write_synthetic_videos(tmp_path_factory.mktemp("src") / "ytvos", 10, 5, 48, 64, seed=4)
    for frame in (src / "JPEGImages/synth0003").iterdir():
        frame.write_bytes(frame.read_bytes()[:200])
    return src


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    """One video a shard: train-000000..4 = synth0000, 0001, (0003 skipped) 0004, 0006, 0008;
    val-000000..3 = synth0002, 0005, 0007, 0009."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    with contextlib.redirect_stdout(io.StringIO()):
        run_sharding(ShardOptions(src=source, out=out, shard_size=30_000, val_fraction=0.3, with_annotations=True))
    videos = {shard["name"]: [s["video_id"] for s in json.loads((out / shard["index"]).read_text())["samples"]]
              for split in json.loads((out / "manifest.json").read_text())["splits"].values()
              for shard in split["shards"]}
    assert videos == {"train-000000.tar": ["synth0000"], "train-000001.tar": ["synth0001"],
                      "train-000002.tar": ["synth0004"], "train-000003.tar": ["synth0006"],
                      "train-000004.tar": ["synth0008"], "val-000000.tar": ["synth0002"],
                      "val-000001.tar": ["synth0005"], "val-000002.tar": ["synth0007"], "val-000003.tar": ["synth0009"]}
    return out


def damage(out: Path) -> list[str]:
    """A flipped byte in a shard between intact ones (the skipped video follows it), the tar and the
    next index of the last two train shards gone, the first val shard's index rewritten."""
    tar = bytearray((out / "train-000001.tar").read_bytes())
    tar[3000] ^= 0x10
    (out / "train-000001.tar").write_bytes(bytes(tar))
    (out / "train-000003.tar").unlink()
    (out / "train-000004.index.json").unlink()
    index = json.loads((out / "val-000000.index.json").read_text())
    (out / "val-000000.index.json").write_text(json.dumps({**index, "samples": index["samples"][::-1]}))
    return ["train-000001.tar", "train-000003.tar", "train-000004.index.json", "val-000000.index.json"]


def test_repair_rewrites_exactly_the_damaged_shards_byte_identical(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    damaged = damage(out)
    verified = tool("--verify", out)
    assert verified.returncode == 1 and f"--repair {out}" in verified.stderr
    for name in damaged:
        assert str(out / name) in verified.stdout
    damaged_shards = {name.split(".")[0] for name in damaged}  # a shard is its tar and its index
    intact = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.split(".")[0] not in damaged_shards}
    assert len(intact) == 2 + 2 * 5  # manifest, report; train-000000 and 000002, val-000001..3

    repaired = tool("--repair", out, "--workers", "2")  # the source recorded in the manifest
    assert repaired.returncode == 0, repaired.stderr
    assert "replaced train-000001.tar, train-000001.index.json, train-000003.tar" in repaired.stdout
    assert folder_bytes(out) == folder_bytes(reference)
    assert {name: (out / name).stat().st_mtime_ns for name in intact} == intact  # never touched
    assert tool("--verify", out).returncode == 0
    again = tool("--repair", out)
    assert again.returncode == 0 and "nothing to repair" in again.stdout


@pytest.mark.parametrize("change", ["frame_reencoded", "video_removed", "neighbour_removed"])
def test_repair_refuses_a_source_that_changed_and_changes_nothing(source, reference, tmp_path, change):
    out, src = tmp_path / "out", tmp_path / "src"
    shutil.copytree(reference, out)
    shutil.copytree(source, src)
    (out / "train-000002.tar").unlink()  # synth0004
    if change == "frame_reencoded":
        frame = src / "JPEGImages/synth0004/00002.jpg"
        Image.open(frame).save(frame, "JPEG", quality=80)
    else:  # its own video, or the one of the intact shard before it that tells where it starts
        shutil.rmtree(src / "JPEGImages" / ("synth0004" if change == "video_removed" else "synth0001"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    result = tool("--repair", out, "--src", src)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    why = {"frame_reencoded": "train-000002.tar would have another sha256 than the manifest's",
           "video_removed": "its videos now fill no shard",
           "neighbour_removed": "video 'synth0001' of train-000001.tar beside them is gone"}[change]
    assert (f"error: --repair: the source {src} no longer gives the bytes of train-000002.tar ({why}); it changed "
            "since the shards were written, and nothing was changed" in result.stderr)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before  # no scratch left


@pytest.mark.slow
def test_repair_killed_while_replacing_finishes_when_run_again(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    damage(out)
    killed = tool("--repair", out, env={"FFF_VDI_SHARD_CRASH_AT": "repair-replaced:3"})
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith("repair.tmp-") for p in out.iterdir())  # its scratch folder, ignored by --verify
    assert tool("--repair", out).returncode == 0
    assert folder_bytes(out) == folder_bytes(reference)


def test_repair_takes_the_output_arguments_from_the_manifest(reference, tmp_path):
    result = tool("--repair", reference, "--shard-size", "1MB", "--out", tmp_path)
    assert result.returncode == 2 and "--repair DIR takes --out, shard_size from DIR's manifest" in result.stderr
