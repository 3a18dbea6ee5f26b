"""torch.compile's artifacts beside the checkpoints (train/compile_artifacts.py): a process on a fresh
compile cache (another node) that loads them builds no inductor graph; an unreadable file costs the
compile time and a warning naming it, never the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fff_vdi.train.compile_artifacts import CompileArtifacts, artifacts_path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import torch
    from torch._dynamo.utils import counters
    from fff_vdi.train.compile_artifacts import CompileArtifacts

    logging.basicConfig(level=logging.INFO)
    artifacts = CompileArtifacts(Path(sys.argv[1]), rank=0, local_rank=0, device=torch.device("cpu"), enabled=True)
    loaded = artifacts.load()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    model.compile(dynamic=False)
    x = torch.randn(8, 16, requires_grad=True)
    model(x).square().mean().backward()
    wrote = artifacts.save()
    print(json.dumps({"loaded": loaded, "wrote": wrote, "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}))
""")


def run(run_dir: Path, cache_dir: Path) -> dict:
    import json

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "log": out.stderr}


def test_a_restart_on_a_fresh_cache_loads_the_artifacts_and_builds_nothing(tmp_path):
    first = run(tmp_path / "run", tmp_path / "node-a")  # the first run: compiles, saves
    path = artifacts_path(tmp_path / "run", 0, torch.device("cpu"))
    assert first["loaded"] == 0 and first["wrote"] and first["misses"] > 0 and path.is_file()
    assert str(path) in first["log"] and "saved" in first["log"]
    again = run(tmp_path / "run", tmp_path / "node-b")  # a restart on another node: its cache is empty
    assert again["loaded"] > 0 and again["misses"] == 0 and again["hits"] == first["misses"]
    assert not again["wrote"]  # nothing new: the file is left as it is
    # A damaged file: a warning that names it, the compile as on a first run, a good file written back.
    path.write_bytes(b"not artifacts")
    damaged = run(tmp_path / "run", tmp_path / "node-c")
    assert damaged["loaded"] == 0 and damaged["wrote"] and damaged["misses"] > 0
    assert f"compile artifacts {path} could not be loaded" in damaged["log"]
    assert path.stat().st_size > 1000


def test_only_the_first_nodes_ranks_write_one_file_per_local_rank(tmp_path):
    cpu = torch.device("cpu")
    other_node = CompileArtifacts(tmp_path, rank=9, local_rank=1, device=cpu, enabled=True)
    assert not other_node.saves and not other_node.save()
    assert other_node.path == artifacts_path(tmp_path, 1, cpu) != artifacts_path(tmp_path, 0, cpu)
    assert f"torch-{torch.__version__}" in other_node.path.name
    off = CompileArtifacts(tmp_path, rank=0, local_rank=0, device=cpu, enabled=False)
    assert off.load() == 0 and not off.save() and not (tmp_path / "compile").exists()
