"""Write files so that readers never see a half-written one.

Everything is written to a temporary name in the destination folder, flushed and fsync'ed, then
renamed over the final name (atomic on POSIX file systems). After a crash the final name holds
either the old complete file or the new complete file; stray `*.tmp-*` files are ignored by readers
and cleaned by the writers that own the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from fff_vdi.errors import FFFVDIError, InputError

TMP_MARK = ".tmp-"


def _default_file_mode() -> int:
    """0o666 minus the process umask: what open() would have created (mkstemp makes 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_temp_name(path: str | os.PathLike) -> bool:
    return TMP_MARK in Path(path).name


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # Shards and checkpoints are read by other users' jobs on shared clusters.
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# Every folder a tool of ours writes whole holds this record of the tool and the files it wrote. A
# folder is only ever replaced (with --overwrite) when the record says the same tool wrote it and it
# holds nothing else: a training run, shards, or a user's own files are never deleted.
OUTPUT_RECORD = ".fff_vdi-output.json"


class OutputFolderError(FFFVDIError, FileExistsError):
    """An output folder exists and may not be (re)written."""


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_can_create(path: str | os.PathLike) -> None:
    """Raise InputError unless `path` (a file or folder to write) can be created: its nearest existing
    folder must take a new file. Probed with a real file, since permissions are not the whole story
    (read-only mounts, root); the error comes before the work, not hours later at the rename."""
    path = Path(path).expanduser().absolute()
    folder = path.parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path}: {folder} is a file, not a folder: choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f"probe{TMP_MARK}"):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write into {folder} ({e.strerror}): choose a folder you can write") from None


# The writer of pipeline folders (models.components.save_pipeline: training's export, the export tool,
# tools/make_tiny_pipeline.py): here, where the tools can check an output folder in milliseconds,
# before they import the networks' libraries (seconds).
PIPELINE_WRITER = "fff_vdi pipeline export"


def check_output_folder(path: str | os.PathLike, writer: str, overwrite: bool) -> None:
    """Raise OutputFolderError unless `writer` may write `path`: absent, an empty folder, or with
    `overwrite` a folder that `writer` wrote and that holds only the files it wrote. Raise
    InputError when it could not be created (check_can_create)."""
    path = Path(path)
    check_can_create(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise OutputFolderError(f"{path} exists and is not a folder: choose another output folder")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise OutputFolderError(f"{path} exists and is not empty: choose another folder or pass --overwrite")
    try:
        record = json.loads((path / OUTPUT_RECORD).read_text())
        recorded = set(record["files"]) if record.get("writer") == writer else None
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is None:
        raise OutputFolderError(f"{path} was not written by {writer} (it has no {OUTPUT_RECORD} of {writer}'s), so it "
                                f"is never replaced, --overwrite or not: choose another folder")
    foreign = [f for f in _relative_files(path) if f != OUTPUT_RECORD and f not in recorded]
    if foreign:
        raise OutputFolderError(f"{path} holds {len(foreign)} file(s) that {writer} did not write (e.g. {foreign[0]}), "
                                f"so it is never replaced: move them out or choose another folder")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, writer: str, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; on a clean exit it is renamed to `path`, on an
    error removed. `path` must be absent or empty, or (with `overwrite`) a folder that `writer` wrote
    (check_output_folder, checked before and after the work); the old one is moved aside and deleted
    once the new one is in place. The new folder records `writer` and its files (OUTPUT_RECORD)."""
    path = Path(path)
    check_output_folder(path, writer, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}{TMP_MARK}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        atomic_write_json(tmp / OUTPUT_RECORD, {"writer": writer, "files": _relative_files(tmp)})
        check_output_folder(path, writer, overwrite)  # the work may take hours: look again
        if path.exists():
            old = path.parent / f"{path.name}{TMP_MARK}old-{secrets.token_hex(4)}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted atomic writes in `folder` (not recursive)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and is_temp_name(p):
                p.unlink()
                removed.append(p)
    return removed
