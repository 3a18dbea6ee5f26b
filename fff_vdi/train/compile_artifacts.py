"""torch.compile's artifacts beside the checkpoints, so that a restart on any node skips inductor.

A compiled run spends minutes in its first step building kernels. Torch keeps what it built in its
caches under the node's /tmp (TORCHINDUCTOR_CACHE_DIR), which a requeued job on other nodes does not
see. `CompileArtifacts` saves `torch.compiler.save_cache_artifacts()` (inductor's compiled graphs,
AOTAutograd's, autotuning results) into the run folder, `<output_dir>/compile/`, after the first
step and whenever something new was compiled since (a validation's inference graphs, checked at
each checkpoint), and hot-loads it at start-up, before anything compiles. Dynamo still traces the
Python code at the restart; inductor finds every graph built.

A compiled graph's key holds its tensors' device index, so the ranks of the first node save one file
per local rank and local rank k of every node loads file k. The file name holds the torch version
and the GPU model: artifacts of another torch or another GPU are never loaded (a new file is made).
The artifacts are a cache: a file that cannot be read costs the compile time, with a warning that
names it; the run goes on.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch

from fff_vdi.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


def artifacts_path(run_dir: Path, local_rank: int, device: torch.device) -> Path:
    """This local rank's artifacts file: per torch version, GPU model and local rank."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = re.sub(r"[^A-Za-z0-9.+-]+", "-", f"torch-{torch.__version__}_{card}").strip("-")
    return Path(run_dir) / "compile" / f"{key}_local-rank-{local_rank:02d}.bin"


class CompileArtifacts:
    def __init__(self, run_dir: Path, rank: int, local_rank: int, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.path = artifacts_path(run_dir, local_rank, device)
        self.saves = rank == local_rank  # the first node's ranks: one file per device index
        self._saved: frozenset = frozenset()  # the artifact keys in the file as last written or loaded

    def load(self) -> int:
        """Hot-load this local rank's file, if there is one; returns the artifacts loaded."""
        if not self.enabled or not self.path.is_file():
            return 0
        tick = time.perf_counter()
        try:
            keys = _keys(torch.compiler.load_cache_artifacts(self.path.read_bytes()))
            why = "" if keys else "torch read no artifacts from it"  # torch logs an unreadable file and returns None
        except Exception as e:  # noqa: BLE001 - a cache: any failure only costs the compile time
            keys, why = frozenset(), f"{type(e).__name__}: {e}"
        if why:
            log.warning("compile artifacts %s could not be loaded (%s): compiling afresh; the file is "
                        "rewritten after the first step", self.path, why)
            return 0
        self._saved = keys
        log.info("compile artifacts: %d loaded from %s in %.1f s", len(self._saved), self.path,
                 time.perf_counter() - tick)
        return len(self._saved)

    def save(self) -> bool:
        """Write every artifact this process compiled or loaded, if any is new since the last write
        (atomically: a reader sees the old file or the new one). Returns whether it wrote."""
        if not (self.enabled and self.saves):
            return False
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        data, info = saved
        keys = _keys(info)
        if not keys or keys <= self._saved:
            return False
        tick = time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, data)
        self._saved = keys
        log.info("compile artifacts: %d (%.0f MB) saved to %s in %.1f s", len(keys), len(data) / 1e6, self.path,
                 time.perf_counter() - tick)
        return True


def _keys(info) -> frozenset:
    """The (kind, key) pairs of a torch.compiler CacheInfo."""
    if info is None:
        return frozenset()
    return frozenset((kind, key) for kind, keys in info.artifacts.items() for key in keys)
