"""Issue 17, points 5 and 7: every OS error of the sharder, --verify and the preview is the tool's own
one-line error naming the path and the fix; --resume is suggested only for a folder that holds an
interrupted sharding run.

Tests run as root, which ignores permission bits: the unwritable places are a path under a regular
file (NotADirectoryError), /proc and /sys (which refuse even root), a file size limit (EFBIG in the
middle of a run) and a shard that is a link to /proc/self/mem (EIO on read)."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fff_vdi.config import DataConfig
from fff_vdi.data.loader import ClipLoader
from fff_vdi.data.shards import ShardSet
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.errors import DataError
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.run import run_sharding
from fff_vdi.sharder.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]


def tool(*args, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """tools/shard_ytvos.py as a user runs it; with `limit_file_size`, writes beyond that many bytes
    fail with EFBIG (as on a full disk), for root too."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "tools/shard_ytvos.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit if limit_file_size else None)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for text in named:
        assert text in errors[0], errors[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_videos(tmp_path_factory.mktemp("src"), 4, 4, 48, 64, seed=2, with_annotations=False)


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        run_sharding(ShardOptions(src=source, out=out, shard_size=40_000))  # 2 shards
    return out


# ------------------------------------------------------------------- 5: OS errors are one clear line

@pytest.mark.parametrize("place", ["under_a_file", "proc", "sys"])
def test_sharder_out_where_no_folder_can_be_made_is_refused_before_any_work(source, tmp_path, place):
    (tmp_path / "a_file").write_text("x")
    out = {"under_a_file": tmp_path / "a_file/shards", "proc": Path("/proc/fff_vdi_test/shards"),
           "sys": Path("/sys/fff_vdi_test")}[place]
    result = tool("--src", source, "--out", out)
    assert_one_line_error(result, f"--out {out}", "pick a folder you can write")
    assert result.returncode == 2 and result.stdout == ""  # refused before scanning or writing anything
    assert (tmp_path / "a_file").read_text() == "x"


def test_sharder_write_error_mid_run_is_one_line_and_resume_finishes(source, shards, tmp_path):
    out = tmp_path / "out"
    failed = tool("--src", source, "--out", out, "--shard-size", "40000", "--workers", "1", limit_file_size=20_000)
    assert_one_line_error(failed, str(out), "File too large", "--resume")
    assert failed.returncode == 1 and not (out / "manifest.json").exists()
    resumed = tool("--src", source, "--out", out, "--shard-size", "40000", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in shards.iterdir()}


def test_verify_lists_a_shard_that_cannot_be_read_and_the_reader_names_it(shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / "train-000001.tar").unlink()
    (out / "train-000001.tar").symlink_to("/proc/self/mem")  # a regular file whose reads fail (EIO)
    problems = verify_shards(out).problems
    assert f"{out / 'train-000001.tar'}: cannot be read (Input/output error)" in problems
    result = tool("--verify", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{out / 'train-000001.tar'}: cannot be read (Input/output error)" in result.stdout
    reader = ShardSet.open(shards)  # then the folder changes under it (a training job's reader)
    video = next(v for v in reader.videos if v.shard == "train-000001.tar")
    reader.root = out
    with pytest.raises(DataError, match=rf"{out / 'train-000001.tar'}: member {video.key}.f00000.jpg cannot be "
                                        rf"read \(Input/output error at offset {video.frames[0][0]}\)"):
        reader.read_frame(video, 0)
    (out / "train-000001.tar").unlink()
    reader.close()
    with pytest.raises(DataError, match=rf"{out / 'train-000001.tar'}: cannot be opened \(No such file or directory\)"):
        reader.read_frame(video, 0)


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_preview_output_that_cannot_be_written_is_refused_before_loading(synthetic_shards, tmp_path, flag):
    (tmp_path / "a_file").write_text("x")
    paths = {"--out": tmp_path / "p.png", "--json": tmp_path / "s.json", flag: tmp_path / "a_file/x"}
    result = subprocess.run([sys.executable, "-m", "fff_vdi.data.preview", "--shards", str(synthetic_shards),
                             "--out", str(paths["--out"]), "--json", str(paths["--json"]), "--device", "cpu",
                             "--frames", "6", "--height", "64", "--width", "96", "--batch-size", "2",
                             "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{flag} {paths[flag]}" in result.stderr and "a_file is a file" in result.stderr
    assert result.stdout == "" and not paths["--out"].exists()  # nothing loaded, nothing written


# ------------------------------------------- 7: --resume only for a folder with an interrupted run

def test_verify_of_a_missing_folder_says_so_and_not_resume(tmp_path):
    result = tool("--verify", tmp_path / "typo")
    assert_one_line_error(result, f"{tmp_path / 'typo'}: no such folder")
    assert "--resume" not in result.stderr


def test_verify_of_a_file_or_a_folder_without_shards_says_what_it_is(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = tool("--verify", tmp_path / "notes.txt")
    assert_one_line_error(result, f"{tmp_path / 'notes.txt'}: a file, not a shard folder")
    result = tool("--verify", tmp_path)
    assert_one_line_error(result, f"{tmp_path}: not a finished shard folder (no manifest.json)",
                          "no sharding run was started there", "tools/shard_ytvos.py --src")
    assert "--resume" not in result.stderr


def test_trainer_shards_pointing_nowhere_say_so_and_not_resume(tmp_path):
    cfg = DataConfig(shards=str(tmp_path / "nowhere"), num_frames=4, height=64, width=64)
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere'}: no such folder") as error:
        ClipLoader(cfg, backend="cpu")
    assert "--resume" not in str(error.value)


def test_an_interrupted_run_is_told_to_resume(source, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "tools/shard_ytvos.py", "--src", str(source), "--out", str(out),
                             "--shard-size", "40000"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FFF_VDI_SHARD_CRASH_AT": "index-written:1"})
    assert killed.returncode == -signal.SIGKILL
    result = tool("--verify", out)
    assert_one_line_error(result, f"{out}: not a finished shard folder (no manifest.json)",
                          "interrupted sharding run", "--resume")
