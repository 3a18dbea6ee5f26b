"""Shared fixtures: the repository, the read-only shared data beside it, and small synthetic shards."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Keep torch from oversubscribing the 2-core CI machine when tests start processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# scripts/test.sh runs the suite on two xdist workers with --dist loadfile: a module's tests stay on one
# worker, so its module-scoped fixtures (a training run, a browser, a cache) are built once. (loadgroup
# would spread single tests, but its groups are lost with pytest 9.2, which keeps node ids where xdist
# 3.8 no longer rewrites them.) The longest modules (a minute or more each) are handed out first, so
# that the two workers finish together.
LONGEST_FIRST = ["test_train", "test_bad_input", "test_learning", "test_train_options", "test_inference",
                 "test_conditioning", "test_compile_artifacts", "test_bench_train_step", "test_outputs_safe", "test_launch", "test_app_browser"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: these tests need the project's shared/ folder checked out beside the repo")
    return SHARED


@pytest.fixture(scope="session")
def davis_sample(shared_dir) -> Path:
    path = shared_dir / "data" / "davis-sample"
    if not (path / "JPEGImages").is_dir():
        pytest.skip(f"{path} has no JPEGImages/: the DAVIS sample is missing from shared/")
    return path


def run_tool(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository script or module the way a user does, from the repository root."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny random pipeline folder made by tools/make_tiny_pipeline.py; copy it before changing it."""
    out = tmp_path_factory.mktemp("tiny") / "pipeline"
    run_tool("tools/make_tiny_pipeline.py", str(out), "--seed", "0")
    return out


@pytest.fixture(scope="session")
def tiny_sam2(tmp_path_factory) -> Path:
    """A tiny random SAM2 video model folder made by tools/make_tiny_sam2.py (loads like downloaded weights)."""
    out = tmp_path_factory.mktemp("sam2") / "tiny_sam2"
    run_tool("tools/make_tiny_sam2.py", str(out), "--seed", "0")
    return out


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """12 synthetic videos (some shorter than a window) of 96x160 frames with object annotations,
    sharded with a validation split."""
    from fff_vdi.data.synthetic import write_synthetic_videos

    root = tmp_path_factory.mktemp("synthetic")
    src = write_synthetic_videos(root / "src", num_videos=12, num_frames=14, height=96, width=160, seed=3)
    # Two short videos, to exercise the short-video policies.
    write_synthetic_videos(root / "src_short", num_videos=2, num_frames=5, height=96, width=160, seed=4)
    for kind in ("JPEGImages", "Annotations"):
        for d in (root / "src_short" / kind).iterdir():
            d.rename(src / kind / f"short_{d.name}")
    out = root / "shards"
    run_tool("tools/shard_ytvos.py", "--src", str(src), "--out", str(out), "--workers", "1",
             "--shard-size", "200KB", "--val-fraction", "0.2", "--with-annotations")
    return out
