"""Fixtures and helpers of the model tests (tests/test_models_*.py import what they use from here).

The parity fixtures live in <repo>/../shared/fixtures/parity (conftest's `shared_dir` skips the
tests when shared/ is absent). The tiny pipeline fixture is conftest's `tiny_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch



@pytest.fixture(scope="session")
def parity_dir(shared_dir) -> Path:
    path = shared_dir / "fixtures" / "parity"
    if not (path / "raft_large.pt").is_file():
        pytest.skip(f"{path} lacks the parity fixtures (raft_large.pt, ...): shared/ is incomplete")
    return path


def load_parity(parity_dir: Path, name: str) -> dict:
    return torch.load(parity_dir / name, map_location="cpu", weights_only=False)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max|ours - theirs| / max|theirs|, the parity criterion (<= 1e-4 in float32 on the CPU)."""
    return float((ours.detach().float() - theirs.float()).abs().max() / theirs.float().abs().max())


def read_key_file(path: Path) -> dict[str, tuple[int, ...]]:
    """A keys_*.txt fixture: one `name<TAB>(shape)` per line."""
    keys = {}
    for line in path.read_text().splitlines():
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}
