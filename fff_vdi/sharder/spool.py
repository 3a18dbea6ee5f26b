"""Hand large byte strings from worker processes to the parent through files in shared memory.

The sharder's workers produce each video's tar members (15 MB for 60 frames of 720p; hundreds of MB
for a long 30 fps video). Through the process pool's result pipe those bytes are pickled, copied
through the kernel and unpickled by the pool's receiving thread, which competes for the GIL with the
parent's other threads. A worker instead writes the bytes to a file under /dev/shm (tmpfs: memory,
not disk) and sends only its name; the parent maps the file, writes it to the shard and deletes it.
Measured on 16 cores at 16 workers: parent CPU per frame 0.77 -> 0.42 ms, workers' 9.7 -> 7.4 ms.

Where /dev/shm is missing, not writable or full (a container's default is 64 MB), the bytes travel in
the result as before: slower, never wrong. Files are named `fff_vdi-spool-<parent pid>-<worker
pid>-<n>`, so a run removes what it left after an error and a later run removes what a killed one
left.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

SHARED_MEMORY = Path("/dev/shm")
PREFIX = "fff_vdi-spool-"
_numbers = itertools.count()


@dataclass
class Payload:
    """Bytes on their way to the parent: in a spool file (`path`) or carried along (`parts`)."""

    size: int
    path: str | None = None
    parts: list[bytes] | None = None

    @contextlib.contextmanager
    def buffers(self) -> Iterator[Sequence]:
        """The bytes as a sequence of buffers (a mapped spool file is not copied)."""
        if self.path is None:
            yield self.parts
            return
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield [mapped]

    def discard(self) -> None:
        """Delete the spool file, if any (idempotent)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@dataclass(frozen=True)
class Spool:
    """Where a worker puts its payloads (picklable: made by the parent, sent with the work).
    `folder` None carries the bytes in the result (no shared memory, or no worker processes)."""

    folder: str | None
    owner_pid: int

    @classmethod
    def for_workers(cls, workers: int) -> "Spool":
        usable = workers > 1 and SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)
        return cls(str(SHARED_MEMORY) if usable else None, os.getpid())

    def put(self, parts: list[bytes]) -> Payload:
        size = sum(len(p) for p in parts)
        if self.folder is None or size == 0:
            return Payload(size, parts=parts)
        path = os.path.join(self.folder, f"{PREFIX}{self.owner_pid}-{os.getpid()}-{next(_numbers)}")
        try:
            with open(path, "xb") as f:  # tmpfs full: ENOSPC here (writes, unlike a mapping, fail cleanly)
                for part in parts:
                    f.write(part)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return Payload(size, parts=parts)
        return Payload(size, path=path)

    def remove_files(self) -> int:
        """Remove this owner's spool files and those of owners no longer running; returns how many."""
        if self.folder is None:
            return 0
        removed = 0
        for entry in os.scandir(self.folder):
            owner = _owner_of(entry.name)
            if owner is not None and (owner == self.owner_pid or not _running(owner)):
                with contextlib.suppress(OSError):  # gone already, or another user's
                    os.unlink(entry.path)
                    removed += 1
        return removed


def _owner_of(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    owner = name[len(PREFIX):].split("-", 1)[0]
    return int(owner) if owner.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
