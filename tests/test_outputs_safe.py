"""No tool deletes or overwrites what it did not write (issue 17, point 1): `export --out RUN` once
exited 0 after deleting the whole training run, and every existing --out was replaced without a word."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import run_tool, snapshot
from fff_vdi.errors import InputError
from fff_vdi.quickstart import remove_own_outputs
from fff_vdi.utils.atomic import OUTPUT_RECORD, OutputFolderError, atomic_folder


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """What a training run folder holds (the refusal comes before any of it is read)."""
    run = tmp_path / "runs" / "X"
    for name, text in {"config.yaml": "name: X\n", "metrics.jsonl": '{"step": 1}\n',
                       "checkpoints/step-00000001/COMPLETE": "", "logs/rank-00000.log": "log\n",
                       "tensorboard/events.out": "ev"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_into_the_run_itself_is_refused_and_deletes_nothing(run_folder, overwrite):
    before = snapshot(run_folder.parent.parent)
    for out in (run_folder, run_folder.parent):  # the run, and the folder holding it
        proc = run_tool("-m", "fff_vdi.train.export", "--run", str(run_folder), "--out", str(out), *overwrite,
                        check=False)
        assert proc.returncode == 2, proc.stderr
        assert str(out) in proc.stderr and "Traceback" not in proc.stderr
        assert ("never replaced" in proc.stderr) == bool(overwrite)  # else: "not empty ... or pass --overwrite"
    assert snapshot(run_folder.parent.parent) == before


def test_make_tiny_pipeline_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):  # a folder it did not write: refused with or without --overwrite
        proc = run_tool("tools/make_tiny_pipeline.py", str(out), *flags, check=False)
        assert proc.returncode == 2 and str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}

    (out / "notes.txt").unlink()
    run_tool("tools/make_tiny_pipeline.py", str(out), "--seed", "1")  # an empty folder is fine
    first = snapshot(out)
    assert "model_index.json" in first and OUTPUT_RECORD in first
    assert run_tool("tools/make_tiny_pipeline.py", str(out), check=False).returncode == 2
    assert snapshot(out) == first
    run_tool("tools/make_tiny_pipeline.py", str(out), "--seed", "2", "--overwrite")  # its own output: replaced
    second = snapshot(out)
    assert second.keys() == first.keys() and second != first
    (out / "unet" / "my_notes.txt").write_text("added by hand")  # ... unless someone added a file
    proc = run_tool("tools/make_tiny_pipeline.py", str(out), "--overwrite", check=False)
    assert proc.returncode == 2 and "unet/my_notes.txt" in proc.stderr
    assert (out / "unet" / "my_notes.txt").read_text() == "added by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no temporary folders left


def test_atomic_folder_checks_again_after_the_work(tmp_path):
    """A file that appears in the destination while the work runs is not deleted either."""
    out = tmp_path / "out"
    with atomic_folder(out, "writer-a") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputFolderError, match="writer-b"):
        with atomic_folder(out, "writer-b", overwrite=True):
            pass
    with pytest.raises(OutputFolderError, match="late.txt"):
        with atomic_folder(out, "writer-a", overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            (out / "late.txt").write_text("user")
    assert sorted(p.name for p in out.iterdir()) == sorted(["a", "late.txt", OUTPUT_RECORD])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_quickstart_fresh_deletes_only_its_own_outputs(tmp_path):
    (tmp_path / "runs" / "tiny_cpu").mkdir(parents=True)
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="thesis.tex"):
        remove_own_outputs(tmp_path)
    assert (tmp_path / "thesis.tex").exists() and (tmp_path / "runs" / "tiny_cpu").is_dir()
    (tmp_path / "thesis.tex").unlink()
    remove_own_outputs(tmp_path)
    assert list(tmp_path.iterdir()) == []
