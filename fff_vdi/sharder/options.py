"""The arguments that shape a sharding run's output, sizes such as '1GB', and worker counts."""

from __future__ import annotations

import decimal
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fff_vdi.errors import InputError

TOOL = "tools/shard_ytvos.py"
SPLITS = ("train", "val")

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in '1GB' (10^9), '500MB', '64MiB' (2^20), '1.5GB' or '1000000'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(f"{text!r} is not a size; use e.g. 1GB, 500MB, 64MiB or a number of bytes")
    size = int(decimal.Decimal(match.group(1)) * unit)
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return size


@dataclass(frozen=True)
class ShardOptions:
    src: Path
    out: Path
    workers: int = 1
    shard_size: int = 10**9
    min_frames: int = 1
    max_side: int | None = None
    val_fraction: float = 0.0
    with_annotations: bool = False
    resume: bool = False

    def validate(self) -> None:
        checks = [("--workers", self.workers, self.workers >= 1, "use 1 or more"),
                  ("--shard-size", self.shard_size, self.shard_size >= 1, "use a positive size such as 1GB"),
                  ("--min-frames", self.min_frames, self.min_frames >= 1, "use 1 or more"),
                  ("--max-side", self.max_side, self.max_side is None or self.max_side >= 16, "use 16 or more"),
                  ("--val-fraction", self.val_fraction, 0.0 <= self.val_fraction < 1.0, "use a value in [0, 1)")]
        for flag, value, ok, fix in checks:
            if not ok:
                raise InputError(f"{flag}={value}: {fix}")

    def output_args(self) -> dict:
        """The arguments that shape the output: recorded in the manifest and compared on --resume.
        --workers, --out and --resume are left out: they do not change a byte of the result."""
        return {"src": str(self.src.resolve()), "shard_size": self.shard_size, "min_frames": self.min_frames,
                "max_side": self.max_side, "val_fraction": self.val_fraction,
                "with_annotations": self.with_annotations}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.val_fraction > 0 else SPLITS[:1]


def usable_cores() -> int:
    """Cores this process may run on (its affinity under Slurm or taskset), else all cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Worker processes for a sharding run on `cores` (default: the usable ones): one fewer than the
    cores from 8 up, where the parent (0.4 ms of CPU per frame: appending, hashing, indexing) needs
    most of a core of its own; every core below that, where another worker gains more. Measured on
    16 cores: 15 workers 2,038 frames/s, 16 workers 1,854; on 2 cores: 2 workers 313, 1 worker 200."""
    cores = usable_cores() if cores is None else cores
    return cores - 1 if cores >= 8 else max(1, cores)
