"""tools/shard_ytvos.py and fff_vdi.sharder: bad input, determinism, kill and resume, --verify,
the shard format, and the reader API (fff_vdi.data.shards) on the output.

CPU only and small (64x48 synthetic frames, a dozen videos), except the davis-sample test, which
uses the real frames in ../shared/data/davis-sample (the `davis_sample` fixture of conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fff_vdi.data.shards import ShardSet
from fff_vdi.sharder.frames import jpeg_frame_header
from fff_vdi.sharder.options import ShardOptions, default_workers, parse_size
from fff_vdi.sharder.run import run_sharding
from fff_vdi.sharder.scan import numbering_note, sanitize_key, split_of
from fff_vdi.sharder.verify import verify_shards
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.errors import DataError, InputError
from fff_vdi.utils.parallel import map_in_order

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "shard_ytvos.py"
EXPECTED_LAYOUT = "ROOT/JPEGImages/<video>/<frame>.jpg"


# ---------------------------------------------------------------------------------------- helpers

def shard_tool(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """tools/shard_ytvos.py run as a user runs it; the exit status is the test's to check."""
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def shard(src: Path, out: Path, **options):
    return run_sharding(ShardOptions(src=Path(src), out=Path(out), **options))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def reasons(report: dict, kind: str) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in report["records"] if r["kind"] == kind}


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def reencode(path: Path, mode: str | None = None, **save) -> None:
    image = Image.open(path)
    image.load()
    (image.convert(mode) if mode else image).save(path, "JPEG", **save)


@pytest.fixture(scope="module")
def clean_source(tmp_path_factory) -> Path:
    """12 videos of 10 frames, 64x48, with annotations."""
    return write_synthetic_videos(tmp_path_factory.mktemp("clean"), 12, 10, 48, 64, seed=3)


RESUME_ARGS = dict(shard_size=parse_size("100KB"), val_fraction=0.3, with_annotations=True)
RESUME_FLAGS = ["--shard-size", "100KB", "--val-fraction", "0.3", "--with-annotations"]


@pytest.fixture(scope="module")
def clean_shards(clean_source, tmp_path_factory) -> Path:
    """The clean source sharded with RESUME_ARGS: train-000000..3 (7 videos), val-000000..2 (5)."""
    out = tmp_path_factory.mktemp("clean_shards") / "shards"
    shard(clean_source, out, **RESUME_ARGS)
    return out


@pytest.fixture(scope="module")
def mixed_source(clean_source, tmp_path_factory) -> Path:
    """The clean source with defects that make records while decoding, in both splits, including
    skipped videos after the last written video of each split (the resume journal's hard case).
    Train: synth0000 1, 3, 4, 6, 8, 10; val: synth0002, 5, 7, 9, 11."""
    root = tmp_path_factory.mktemp("mixed") / "src"
    shutil.copytree(clean_source, root)
    frames = root / "JPEGImages"
    (frames / "synth0000/00003.jpg").write_bytes(b"")
    reencode(frames / "synth0001/00005.jpg", progressive=True)
    Image.open(frames / "synth0007/00002.jpg").resize((32, 24)).save(frames / "synth0007/00002.jpg")
    for video in ("synth0010", "synth0011"):
        for frame in (frames / video).iterdir():
            frame.write_bytes(frame.read_bytes()[:200])
    (frames / "synth0003/00004.jpg").unlink()  # records made by the scan: a gap (and its orphan mask), a stray file
    (frames / "README.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def reference(mixed_source, tmp_path_factory) -> Path:
    """An uninterrupted run (1 worker) on the mixed source that other runs must reproduce byte for byte:
    train-000000..2 (6 videos), val-000000..1 (4 videos)."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    shard(mixed_source, out, **RESUME_ARGS)
    return out


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory) -> Path:
    """One defect per video (6 frames each, 64x48); see the expectations in test_bad_input_*."""
    root = write_synthetic_videos(tmp_path_factory.mktemp("bad"), 9, 6, 48, 64, seed=1)
    frames, masks = root / "JPEGImages", root / "Annotations"
    truncated = frames / "synth0000/00001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:400])
    (frames / "synth0001/00001.jpg").write_bytes(b"")
    png = io.BytesIO()
    Image.open(frames / "synth0002/00001.jpg").save(png, "PNG")
    (frames / "synth0002/00001.jpg").write_bytes(png.getvalue())
    corrupt = bytearray((frames / "synth0003/00001.jpg").read_bytes())
    corrupt[len(corrupt) // 2:len(corrupt) // 2 + 40] = b"\xff" * 40
    (frames / "synth0003/00001.jpg").write_bytes(bytes(corrupt))
    reencode(frames / "synth0004/00001.jpg", progressive=True, quality=90)
    reencode(frames / "synth0004/00002.jpg", mode="CMYK", quality=90)
    reencode(frames / "synth0004/00003.jpg", mode="L", quality=90)
    (masks / "synth0004/00001.png").write_bytes(b"not a png")
    (masks / "synth0004/00002.png").unlink()
    Image.new("P", (10, 10)).save(masks / "synth0004/00003.png")
    (frames / "synth0005/00002.jpg").unlink()  # a gap in the numbering
    (frames / "synth0005/notes.txt").write_text("not a frame")
    Image.open(frames / "synth0006/00004.jpg").resize((32, 24)).save(frames / "synth0006/00004.jpg")
    (frames / "synth0006/._00000.jpg").write_bytes(b"macOS resource fork")
    for name in ("00002", "00003", "00004", "00005"):
        (frames / f"synth0007/{name}.jpg").unlink()  # 2 frames left
    for name in ("00000", "00001", "00002", "00003"):
        (frames / f"synth0008/{name}.jpg").write_bytes(b"")  # 2 usable frames left
    (frames / "emptyvid").mkdir()
    shutil.copytree(frames / "synth0000", frames / "dup.0009")  # key dup_0009, taken first ('.' < '_')
    shutil.copytree(frames / "synth0001", frames / "dup_0009")
    (frames / "README.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def bad_run(bad_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_out") / "shards"
    return shard(bad_source, out, min_frames=3, with_annotations=True)


# ---------------------------------------------------------------------------------- small helpers

def test_parse_size_accepts_decimal_and_binary_units():
    assert parse_size("1GB") == 1_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("64MiB") == 67_108_864
    assert parse_size("1000000") == 1_000_000
    assert parse_size("1.5gb") == 1_500_000_000
    for bad in ("", "1XB", "-1MB", "0", "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cli_names_the_flag_and_value_of_bad_arguments(tmp_path):
    result = shard_tool("--src", tmp_path, "--out", tmp_path / "o", "--shard-size", "1XB")
    assert result.returncode == 2
    assert "--shard-size" in result.stderr and "'1XB'" in result.stderr
    result = shard_tool("--out", tmp_path / "o")
    assert result.returncode == 2 and "--src" in result.stderr
    result = shard_tool("--src", tmp_path, "--out", tmp_path / "o", "--val-fraction", "1.5")
    assert result.returncode == 2 and "--val-fraction=1.5" in result.stderr
    result = shard_tool("--verify", tmp_path, "--workers", "0")
    assert result.returncode == 2 and "--workers=0" in result.stderr


def test_default_workers_leave_the_parent_a_core_on_larger_machines():
    assert [default_workers(n) for n in (1, 2, 4, 7, 8, 16, 64)] == [1, 2, 4, 7, 7, 15, 63]


def test_sanitize_key_and_split_are_stable():
    assert sanitize_key("a.b c/é-_9") == "a_b_c__-_9"
    # sha1-based, so fixed across processes and Python versions (these values were computed once).
    assert [split_of(f"synth{i:04d}", 0.3) for i in range(6)] == ["train", "train", "val", "train", "train", "val"]
    assert split_of("synth0002", 0.0) == "train"


def test_numbering_note_tolerates_the_6fps_step_and_reports_gaps():
    assert numbering_note(["00000.jpg", "00005.jpg", "00010.jpg"]) is None
    assert numbering_note(["00000.jpg", "00005.jpg", "00015.jpg", "00020.jpg"]) == (
        "frame numbering (step 5) jumps 1 time(s): 00005->00015; frames kept in order")
    assert numbering_note(["a.jpg", "b.jpg"]) is None


def test_parallel_map_keeps_order_and_fails_fast_when_a_worker_dies():
    assert list(map_in_order(abs, range(-7, 0), 2)) == [7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(BrokenProcessPool):
        list(map_in_order(os._exit, [3, 3, 3], 2))  # a worker killed mid-task must not hang the run


def test_jpeg_frame_header_reads_the_sof_segment():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    assert jpeg_frame_header(buffer.getvalue()) == (0xC0, 8, 3)
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "JPEG", progressive=True)
    assert jpeg_frame_header(buffer.getvalue()) == (0xC2, 8, 1)
    assert jpeg_frame_header(b"\xff\xd8\xff\xd9") is None


# ------------------------------------------------------------------------------------- bad input

def test_bad_input_frames_are_skipped_with_their_reason(bad_run):
    skipped = reasons(bad_run.report, "skipped_frame")
    assert skipped.pop("JPEGImages/synth0001/00001.jpg") == "empty file (0 bytes)"
    assert skipped.pop("JPEGImages/synth0002/00001.jpg") == "not a JPEG (PNG data)"
    assert skipped.pop("JPEGImages/synth0000/00001.jpg").startswith("cannot decode (OSError: ")
    assert skipped.pop("JPEGImages/synth0003/00001.jpg").startswith("cannot decode (OSError: ")
    assert skipped.pop("JPEGImages/synth0006/00004.jpg") == "frame is 32x24, the video's frames are 64x48"
    # synth0008 lost 4 frames, then the video (below); dup_0009 is a copy of synth0000.
    assert sorted(skipped) == ["JPEGImages/dup.0009/00001.jpg"] + [
        f"JPEGImages/synth0008/0000{i}.jpg" for i in range(4)]


def test_bad_input_videos_are_skipped_with_their_reason(bad_run):
    assert reasons(bad_run.report, "skipped_video") == {
        "JPEGImages/emptyvid": "no .jpg/.jpeg frames in the folder",
        "JPEGImages/dup_0009": "key 'dup_0009' (the id sanitised to [A-Za-z0-9_-]) is already used by video 'dup.0009'",
        "JPEGImages/synth0007": "2 frames, fewer than --min-frames=3",
        "JPEGImages/synth0008": "2 usable frames (4 skipped), fewer than --min-frames=3",
    }
    # Kept: 8 videos of 6 frames, less one frame in each of synth0000-0003, synth0005, synth0006, dup.0009.
    assert bad_run.manifest["totals"] == {"videos": 8, "frames": 41, "bytes": bad_run.manifest["totals"]["bytes"],
                                          "skipped_videos": 4, "skipped_frames": 10, "repaired_frames": 3}


def test_bad_input_repairs_progressive_cmyk_and_grayscale(bad_run, bad_source):
    assert reasons(bad_run.report, "repaired_frame") == {
        "JPEGImages/synth0004/00001.jpg": "progressive JPEG re-encoded as baseline RGB (quality 95)",
        "JPEGImages/synth0004/00002.jpg": "CMYK JPEG re-encoded as baseline RGB (quality 95)",
        "JPEGImages/synth0004/00003.jpg": "grayscale JPEG re-encoded as baseline RGB (quality 95)",
    }
    shards = ShardSet.open(bad_run.out)
    video = next(v for v in shards.videos if v.video_id == "synth0004")
    assert shards.read_meta(video)["repaired"] == [1, 2, 3]
    for i in range(6):
        data = shards.read_frame(video, i)
        assert jpeg_frame_header(data) == (0xC0, 8, 3)
        original = bad_source / "JPEGImages/synth0004" / f"{i:05d}.jpg"
        if i in (1, 2, 3):
            assert Image.open(io.BytesIO(data)).mode == "RGB"
            stored = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
            source = np.asarray(Image.open(original).convert("L"), dtype=np.float32)  # CMYK and gray compare in luma
            assert np.abs(stored - source).mean() < 3
        else:
            assert data == original.read_bytes()


def test_bad_input_gaps_and_stray_files_are_noted_and_frames_kept(bad_run):
    assert [(r["path"], r["reason"]) for r in bad_run.report["records"] if r["kind"] == "note"] == [
        ("JPEGImages/README.txt", "ignored: not a video folder"),
        ("JPEGImages/synth0005", "ignored 1 entries that are not .jpg/.jpeg frames: notes.txt"),
        ("JPEGImages/synth0005", "frame numbering (step 1) jumps 1 time(s): 00001->00003; frames kept in order"),
        ("Annotations/synth0005", "ignored 1 annotation PNGs without a frame: 00002.png"),
        ("JPEGImages/synth0006", "ignored 1 entries that are not .jpg/.jpeg frames: ._00000.jpg"),
    ]
    shards = ShardSet.open(bad_run.out)
    meta = shards.read_meta(next(v for v in shards.videos if v.video_id == "synth0005"))
    assert meta["frame_names"] == ["00000.jpg", "00001.jpg", "00003.jpg", "00004.jpg", "00005.jpg"]


def test_bad_input_masks_are_dropped_per_frame_not_the_frame(bad_run):
    assert reasons(bad_run.report, "mask") == {
        "Annotations/synth0004": "1 of 6 frames have no annotation PNG",
        "Annotations/synth0004/00001.png": "not a PNG (starts with 6e6f7420): the frame has no mask",
        "Annotations/synth0004/00003.png": "mask is 10x10, its frame is 64x48: the frame has no mask",
        "Annotations/dup.0009": "no annotation folder: no frame of this video has a mask",
    }
    shards = ShardSet.open(bad_run.out)
    video = next(v for v in shards.videos if v.video_id == "synth0004")
    assert video.num_frames == 6 and shards.read_meta(video)["mask_frames"] == [0, 4, 5]
    assert [shards.read_mask(video, i) is not None for i in range(6)] == [True, False, False, False, True, True]


def test_bad_input_summary_lists_every_skip_and_exits_zero(bad_source, tmp_path):
    result = shard_tool("--src", bad_source, "--out", tmp_path / "o", "--min-frames", "3", "--with-annotations",
                      "--workers", "2")
    assert result.returncode == 0, result.stderr
    report = load_json(tmp_path / "o/report.json")
    for r in report["records"]:
        if r["kind"] in ("skipped_video", "skipped_frame"):
            assert f"  {r['path']}: {r['reason']}" in result.stdout
    assert "skipped videos: 4" in result.stdout and "skipped frames: 10" in result.stdout


@pytest.mark.parametrize("layout", ["empty", "flat", "nested", "missing", "file"])
def test_unusable_source_exits_nonzero_naming_path_and_layout(tmp_path, clean_source, layout):
    src = tmp_path / "src"
    if layout == "empty":
        src.mkdir()
    elif layout == "flat":  # frames without video folders
        shutil.copytree(clean_source / "JPEGImages/synth0000", src)
    elif layout == "nested":  # the split folder above the dataset root
        shutil.copytree(clean_source / "JPEGImages", src / "train/JPEGImages")
    elif layout == "file":
        src.write_text("x")
    result = shard_tool("--src", src, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"--src {src}" in result.stderr and EXPECTED_LAYOUT in result.stderr
    hint = {"empty": "the folder is empty", "flat": "holds 10 JPEG files directly",
            "nested": f"did you mean --src {src / 'train'}?", "missing": "does not exist", "file": "is not a folder"}
    assert hint[layout] in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_usable_video_after_decoding_exits_nonzero_without_manifest(tmp_path, clean_source):
    src = tmp_path / "src/JPEGImages"
    shutil.copytree(clean_source / "JPEGImages/synth0000", src / "v")
    for frame in (src / "v").iterdir():
        frame.write_bytes(b"")
    result = shard_tool("--src", src.parent, "--out", tmp_path / "out")
    assert result.returncode == 2 and "no usable video" in result.stderr and EXPECTED_LAYOUT in result.stderr
    assert "JPEGImages/v: no usable frame (all 10 skipped)" in result.stdout
    assert not (tmp_path / "out/manifest.json").exists()


def test_missing_annotation_folder_is_an_error_naming_both_names(tmp_path, clean_source):
    shutil.copytree(clean_source / "JPEGImages", tmp_path / "src/JPEGImages")
    with pytest.raises(InputError, match="Annotations or .*Masks"):
        shard(tmp_path / "src", tmp_path / "out", with_annotations=True)


# ---------------------------------------------------------------------------------- shard format

def test_tar_members_are_sorted_with_fixed_metadata_and_match_the_index(clean_shards):
    manifest = load_json(clean_shards / "manifest.json")
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            index = load_json(clean_shards / entry["index"])
            with tarfile.open(clean_shards / entry["name"]) as tar:
                members = tar.getmembers()
            assert [m.name for m in members] == sorted(m.name for m in members)
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
                (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
            data = (clean_shards / entry["name"]).read_bytes()
            by_name = {m.name: m for m in members}
            assert entry["bytes"] == len(data) == index["bytes"]
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() == index["sha256"]
            assert entry["index_sha256"] == hashlib.sha256((clean_shards / entry["index"]).read_bytes()).hexdigest()
            for sample in index["samples"]:
                key = sample["key"]
                named = [(f"{key}.f{i:05d}.jpg", m) for i, m in enumerate(sample["frames"])]
                named += [(f"{key}.json", sample["json"])]
                named += [(f"{key}.m{i:05d}.png", m) for i, m in enumerate(sample["masks"]) if m is not None]
                for name, (offset, size, crc) in named:
                    assert (by_name[name].offset_data, by_name[name].size) == (offset, size)
                    assert zlib.crc32(data[offset:offset + size]) == crc
                assert len(named) == sum(m.name.startswith(key + ".") for m in members)


def test_sample_json_holds_the_spec_fields(clean_shards, clean_source):
    shards = ShardSet.open(clean_shards)
    video = shards.videos[0]
    assert shards.read_meta(video) == {
        "video_id": video.video_id, "key": video.video_id, "source": f"JPEGImages/{video.video_id}",
        "frame_names": [f"{i:05d}.jpg" for i in range(10)], "width": 64, "height": 48, "num_frames": 10,
        "repaired": [], "downscaled": False, "mask_frames": list(range(10)),
        "annotation_source": f"Annotations/{video.video_id}"}


def test_shards_are_filled_greedily_in_sorted_order(clean_shards):
    manifest = load_json(clean_shards / "manifest.json")
    size_limit = manifest["args"]["shard_size"]
    for split in manifest["splits"].values():
        samples = [(entry, load_json(clean_shards / entry["index"])["samples"]) for entry in split["shards"]]
        ids = [s["video_id"] for _, shard_samples in samples for s in shard_samples]
        assert ids == sorted(ids)
        for (entry, shard_samples), (_, next_samples) in zip(samples, samples[1:] + [(None, None)]):
            assert entry["bytes"] <= size_limit or len(shard_samples) == 1
            if next_samples:  # the next video would not have fitted
                last_end = max(m[0] + m[1] for s in shard_samples[-1:] for m in _members(s))
                nxt = next_samples[0]
                next_bytes = _padded(max(m[0] + m[1] for m in _members(nxt))) - (nxt["frames"][0][0] - 512)
                assert _closed(_padded(last_end) + next_bytes) > size_limit


def _members(sample):
    return sample["frames"] + [sample["json"]] + [m for m in sample["masks"] or [] if m]


def _padded(offset: int) -> int:
    return offset + (-offset % 512)


def _closed(offset: int) -> int:
    return _padded(offset + 1024) + (-(offset + 1024) % 10240)


def test_split_follows_sha1_of_the_id_and_is_stable_under_subsets(clean_shards, clean_source, tmp_path):
    manifest = load_json(clean_shards / "manifest.json")
    split_ids = {split: [s["video_id"] for entry in manifest["splits"][split]["shards"]
                         for s in load_json(clean_shards / entry["index"])["samples"]] for split in ("train", "val")}
    for split, ids in split_ids.items():
        for video_id in ids:
            hashed = int(hashlib.sha1(video_id.encode()).hexdigest()[:16], 16) / 2**64
            assert (hashed < 0.3) == (split == "val")
    assert len(split_ids["val"]) == 5 and len(split_ids["train"]) == 7
    shutil.copytree(clean_source / "JPEGImages", tmp_path / "subset/JPEGImages",
                    ignore=lambda folder, names: [n for n in names if n.endswith(("3", "5", "8"))])
    summary = shard(tmp_path / "subset", tmp_path / "out", val_fraction=0.3)
    subset_val = [s["video_id"] for entry in summary.manifest["splits"]["val"]["shards"]
                  for s in load_json(tmp_path / "out" / entry["index"])["samples"]]
    assert subset_val == [v for v in split_ids["val"] if not v.endswith(("3", "5", "8"))]


def test_max_side_downscales_frames_and_masks(clean_source, tmp_path):
    summary = shard(clean_source, tmp_path / "out", max_side=32, with_annotations=True)
    assert summary.report["totals"]["downscaled_videos"] == 12
    assert reasons(summary.report, "downscaled_video")["JPEGImages/synth0000"] == (
        "64x48 downscaled to 32x24 (--max-side=32)")
    shards = ShardSet.open(summary.out)
    for video in shards.videos:
        meta = shards.read_meta(video)
        assert (video.width, video.height, meta["downscaled"], meta["repaired"]) == (32, 24, True, [])
        frame = Image.open(io.BytesIO(shards.read_frame(video, 3)))
        mask = Image.open(io.BytesIO(shards.read_mask(video, 3)))
        assert (frame.size, frame.format, mask.size, mask.mode) == ((32, 24), "JPEG", (32, 24), "P")
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    assert verify_shards(summary.out).problems == []


def test_davis_sample_with_masks_keeps_original_bytes(davis_sample, tmp_path):
    summary = shard(davis_sample, tmp_path / "out", with_annotations=True)
    shards = ShardSet.open(summary.out)
    (video,) = shards.videos
    assert (video.video_id, video.num_frames, video.width, video.height, shards.has_masks) == (
        "bmx-trees", 80, 432, 240, True)
    meta = shards.read_meta(video)
    assert meta["annotation_source"] == "Masks/bmx-trees" and meta["mask_frames"] == list(range(80))
    for i in (0, 41, 79):
        assert shards.read_frame(video, i) == (davis_sample / f"JPEGImages/bmx-trees/{i:05d}.jpg").read_bytes()
        assert shards.read_mask(video, i) == (davis_sample / f"Masks/bmx-trees/{i:05d}.png").read_bytes()
    assert summary.report["records"] == [] and summary.manifest["totals"]["frames"] == 80
    check = verify_shards(summary.out)
    assert (check.problems, check.frames, check.masks) == ([], 80, 80)


# ------------------------------------------------------------------------- determinism and resume

def test_two_runs_and_one_or_two_workers_are_byte_identical(mixed_source, reference, tmp_path):
    shard(mixed_source, tmp_path / "again", **RESUME_ARGS)
    shard(mixed_source, tmp_path / "two_workers", workers=2, **RESUME_ARGS)
    assert folder_bytes(tmp_path / "again") == folder_bytes(reference)
    assert folder_bytes(tmp_path / "two_workers") == folder_bytes(reference)
    shards = {split: [(s["name"], s["videos"]) for s in entry["shards"]]
              for split, entry in load_json(reference / "manifest.json")["splits"].items()}
    assert shards == {"train": [("train-000000.tar", 2), ("train-000001.tar", 2), ("train-000002.tar", 2)],
                      "val": [("val-000000.tar", 2), ("val-000001.tar", 2)]}
    report = load_json(reference / "report.json")
    assert {k: v for k, v in report["totals"].items() if k in ("skipped_videos", "skipped_frames", "repaired_frames")} \
        == {"skipped_videos": 2, "skipped_frames": 22, "repaired_frames": 1}
    assert [r["stage"] for r in report["records"]].count("scan") == 3  # gap, orphan mask, README.txt


# Where the hook kills the run: mid-tar, before and after a tar is renamed, after an index, after
# the final report (before the manifest). The reference has 2 videos a shard, train-000000..2 then
# val-000000..1: sample 8 and tar 4 are in val; index 3 and 5 are the last of a split, each followed
# by a skipped video.
CRASH_POINTS = ["sample-written:1", "sample-written:2", "sample-written:8", "tar-written:2", "tar-renamed:1",
                "tar-renamed:4", "index-written:3", "index-written:5", "report-finished:1"]


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_then_resume_is_byte_identical(mixed_source, reference, tmp_path, point):
    out = tmp_path / "out"
    killed = shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS, env={"FFF_VDI_SHARD_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    refused = shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS, "--resume", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.slow
def test_resume_twice_in_a_row_is_byte_identical(mixed_source, reference, tmp_path):
    out = tmp_path / "out"
    for point in ("sample-written:2", "index-written:4"):
        killed = shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS, "--resume",
                          env={"FFF_VDI_SHARD_CRASH_AT": point})
        assert killed.returncode == -signal.SIGKILL
    assert shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS, "--resume").returncode == 0
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.slow
def test_external_kill_9_of_a_parallel_run_then_resume(tmp_path):
    src = write_synthetic_videos(tmp_path / "src", 24, 12, 240, 320, seed=5, with_annotations=False)
    args = ["--src", src, "--shard-size", "2MB", "--workers", "2"]
    assert shard_tool(*args, "--out", tmp_path / "reference").returncode == 0
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(TOOL), *map(str, args), "--out", str(out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "train-000000.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert shard_tool(*args, "--out", out, "--resume").returncode == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")


def test_resume_of_a_finished_folder_does_nothing(reference, mixed_source, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    result = shard_tool("--src", mixed_source, "--out", out, *RESUME_FLAGS, "--resume")
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_resume_without_an_earlier_run_starts_one(clean_shards, clean_source, tmp_path):
    result = shard_tool("--src", clean_source, "--out", tmp_path / "out", *RESUME_FLAGS, "--resume")
    assert result.returncode == 0 and "holds no earlier run; starting a new one" in result.stdout
    assert folder_bytes(tmp_path / "out") == folder_bytes(clean_shards)


def test_output_folder_rules(reference, mixed_source, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(InputError, match="already holds a finished shard set; pass --resume"):
        shard(mixed_source, out, **RESUME_ARGS)
    with pytest.raises(InputError, match=r"other arguments \(shard_size: 100000 then, 70000 now\)"):
        shard(mixed_source, out, resume=True, **{**RESUME_ARGS, "shard_size": 70000})
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("x")
    with pytest.raises(InputError, match="did not write \\(notes.txt\\); pick an empty folder"):
        shard(mixed_source, tmp_path / "other")


# ---------------------------------------------------------------------------------------- verify

def test_verify_passes_a_clean_folder(clean_shards):
    result = shard_tool("--verify", clean_shards)
    assert result.returncode == 0
    assert "verify: OK" in result.stdout and "12 videos, 120 frames, 120 masks" in result.stdout


def test_verify_names_the_shard_and_member_of_a_flipped_byte(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    index = load_json(out / "train-000000.index.json")
    sample = index["samples"][0]
    offset, size, _ = sample["frames"][3]
    tar = out / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset + size // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    result = shard_tool("--verify", out)
    assert result.returncode == 1
    assert f"{tar}: sha256 differs from manifest.json's" in result.stdout
    assert f"{tar}: member {sample['key']}.f00003.jpg: crc32" in result.stdout
    assert "1 problems" not in result.stderr and "problems in" in result.stderr


def test_verify_catches_a_flipped_mask_byte_and_a_stray_shard(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    sample = load_json(out / "val-000000.index.json")["samples"][0]
    offset, size, _ = sample["masks"][2]
    tar = out / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset + size - 5] ^= 0x80
    tar.write_bytes(bytes(data))
    shutil.copy(tar, out / "val-000099.tar")
    problems = verify_shards(out).problems
    assert f"{tar}: member {sample['key']}.m00002.png: crc32" in "\n".join(problems)
    assert f"{out / 'val-000099.tar'}: shard file not listed in manifest.json (left from another run?)" in problems


def test_verify_catches_a_damaged_tar_header(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    sample = load_json(out / "train-000001.index.json")["samples"][0]
    header = sample["frames"][4][0] - 512
    tar = out / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[header + 2] ^= 0x20  # a letter of the member name: the header checksum fails
    tar.write_bytes(bytes(data))
    problems = verify_shards(out).problems
    assert problems == [f"{tar}: sha256 differs from manifest.json's",
                        f"{tar}: member {sample['key']}.f00004.jpg: indexed at offset {header + 512} but the tar ends "
                        "before it"]


def test_verify_of_an_unfinished_folder_names_it_and_the_fix(tmp_path):
    result = shard_tool("--verify", tmp_path)
    assert result.returncode == 2  # a wrong argument, not damage found (exit 1)
    assert f"{tmp_path}: not a finished shard folder (no manifest.json)" in result.stderr


# ------------------------------------------------------------------------------------ reader API

def test_reader_returns_the_original_jpeg_bytes(clean_shards, clean_source):
    shards = ShardSet.open(clean_shards, "train")
    assert [v.video_id for v in shards.videos] == sorted(v.video_id for v in shards.videos)
    assert len(shards.videos) == 7 and shards.has_masks and shards.split == "train"
    for video in shards.videos:
        assert shards.frame_name(video, 12) == f"{video.key}.f00012.jpg"
        for i in (0, 4, 9):
            source = clean_source / "JPEGImages" / video.video_id / f"{i:05d}.jpg"
            assert shards.read_frame(video, i) == source.read_bytes()
            mask = clean_source / "Annotations" / video.video_id / f"{i:05d}.png"
            assert shards.read_mask(video, i) == mask.read_bytes()
    val = ShardSet.open(clean_shards, "val")
    assert len(val.videos) == 5 and {v.split for v in val.videos} == {"val"}


def test_reader_crc_mismatch_names_the_shard_and_member(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    shards = ShardSet.open(out)
    video = shards.videos[0]
    offset, size, _ = video.frames[2]
    with open(out / video.shard, "r+b") as f:
        f.seek(offset + 10)
        byte = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match=rf"{out / video.shard}: member {video.key}\.f00002\.jpg fails its crc32"):
        shards.read_frame(video, 2)
    assert len(ShardSet.open(out, verify_crc=False).read_frame(video, 2)) == size


def test_reader_short_read_names_the_shard_and_member(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    shards = ShardSet.open(out)
    video = shards.videos[0]
    os.truncate(out / video.shard, video.frames[5][0] + 3)
    with pytest.raises(DataError, match=rf"member {video.key}\.f00005\.jpg is cut short \(3 of "):
        shards.read_frame(video, 5)


def test_reader_errors_for_missing_and_mismatched_files(clean_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_shards, out)
    with pytest.raises(DataError, match=r"no split 'test'; available: \['train', 'val'\]"):
        ShardSet.open(out, "test")
    index_path = out / "train-000001.index.json"
    index = load_json(index_path)
    index_path.write_text(json.dumps({**index, "sha256": "0" * 64}))
    with pytest.raises(DataError, match=rf"index mismatch: {out / 'train-000001.tar'} .*{index_path}"):
        ShardSet.open(out)
    (out / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=rf"{out / 'train-000001.tar'}: shard listed in .* is missing; restore it, or "
                                        "re-shard"):
        ShardSet.open(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match=rf"{out}: not a finished shard folder .*--resume"):
        ShardSet.open(out)


def test_reader_pickles_without_descriptors_and_reopens_after_fork(clean_shards):
    shards = ShardSet.open(clean_shards)
    video = shards.videos[1]
    expected = shards.read_frame(video, 1)
    assert shards._files._fds  # opened lazily by the read
    clone = pickle.loads(pickle.dumps(shards))
    assert clone._files._fds == {} and clone.read_frame(video, 1) == expected
    pid = os.fork()
    if pid == 0:  # child: must open its own descriptor and read the same bytes
        ok = shards.read_frame(video, 1) == expected and shards._files._fds and shards._files._pid == os.getpid()
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    shards.close()
    assert shards._files._fds == {}
