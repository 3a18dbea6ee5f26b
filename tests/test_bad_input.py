"""Every entry point against bad input (issue 17): missing, empty, of the wrong type or size, unwritable,
an existing output, truncated, interrupted. Each row runs the tool as a user does (one process, from the
repository root) and asserts its exit status, that it prints one error line naming the culprit and no
traceback, and that nothing under the test's folder changed: no file of the user's touched, no output
or temporary file left. The trainer's rows fail before torch is imported. The last tests are the
trainer's under torchrun (the root cause it prints is ours) and from another folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_tool, snapshot

# The first word of each tool's error line.
ERROR_PREFIXES = ("error:", "export:", "verify:", "preview:")
ARGPARSE_ERROR = re.compile(r"^\S+: error: ")  # argparse's line for a bad argument (after its usage line)


@dataclass
class Inputs:
    """What a row builds its command from: its own folder, and read-only shared inputs."""

    root: Path
    pipeline: Path
    shards: Path
    unwritable: Path | None

    def folder(self, name: str, files: dict[str, str | bytes] | None = None) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        for rel, content in (files or {}).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def file(self, name: str, content: str | bytes = "not what the tool expects\n") -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    @property
    def videos(self) -> Path:
        """The synthetic videos the shards were written from (conftest's synthetic_shards)."""
        return self.shards.parent / "src"

    def shard_copy(self) -> Path:
        return Path(shutil.copytree(self.shards, self.root / "shards"))

    def frames(self, name: str, count: int, width: int, height: int, value: int | None = None) -> Path:
        """A folder of PNG frames (or masks with `value`: 0 nowhere a hole, 255 a hole everywhere)."""
        folder = self.folder(name)
        rng = np.random.default_rng(0)
        for i in range(count):
            pixels = (np.full((height, width), value, np.uint8) if value is not None
                      else rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        return folder

    def needs_unwritable(self) -> Path:
        if self.unwritable is None:
            pytest.skip("no folder here refuses this user's writes (root on a writable /sys?)")
        return self.unwritable


@dataclass
class Case:
    id: str
    tool: list[str]  # script path or ["-m", module]
    build: Callable[[Inputs], tuple[list[str], list[str]]]  # -> (arguments, what the error line must name)
    code: int = 2
    absent: tuple[str, ...] = ()  # what the error line must not say
    marks: list = field(default_factory=list)


def train_args(i: Inputs, **override) -> list[str]:
    """Valid training arguments but for `override`: only the culprit is wrong."""
    values = {"experiment": "tiny_cpu", "experiment.model.pretrained": str(i.pipeline),
              "experiment.data.shards": str(i.shards), "experiment.output_dir": str(i.root / "run"),
              **override}
    return [f"{k}={v}" for k, v in values.items() if v is not None]  # None: leave the key out


RUN_CONFIG = "name: x\noutput_dir: runs/x\ndata:\n  shards: shards\n"  # the least a run's config.yaml holds


def run_folder(i: Inputs, config: str = RUN_CONFIG, checkpoints: tuple[str, ...] = ()) -> Path:
    files = {"config.yaml": config, **{f"checkpoints/{c}/.metadata": "" for c in checkpoints}}
    return i.folder("runs/x", files)


def truncated(path: Path, keep: int) -> Path:
    with open(path, "r+b") as f:
        f.truncate(keep)
    return path


SHARD = ["tools/shard_ytvos.py"]
PREVIEW = ["-m", "fff_vdi.data.preview"]
TRAIN = ["launch/train.py"]
EXPORT = ["-m", "fff_vdi.train.export"]
INPAINT = ["-m", "fff_vdi.inpaint"]
EVALUATE = ["-m", "fff_vdi.evaluate"]
TINY = ["tools/make_tiny_pipeline.py"]
PRECOMPUTE = ["tools/precompute_conditioning.py"]
QUICKSTART = ["-m", "fff_vdi.quickstart"]


def inpaint_args(i: Inputs, video: Path | None = None, masks: Path | None = None, **flags) -> list[str]:
    video = video or i.frames("video", 3, 128, 128)
    masks = masks or i.frames("masks", 3, 128, 128, value=255)
    values = {"--video": video, "--masks": masks, "--model": i.pipeline, "--out": i.root / "result",
              "--device": "cpu", "--steps": 1, **flags}
    return [str(x) for kv in values.items() for x in kv]


def truncated_video(i: Inputs) -> Path:
    from fff_vdi.inference.video_io import write_mp4

    path = i.root / "clip.mp4"
    write_mp4(path, np.zeros((4, 64, 64, 3), np.uint8), fps=7)
    return truncated(path, 100)


CASES = [
    # -- the sharder and --verify -------------------------------------------------------------------
    Case("shard/src-missing", SHARD, lambda i: (["--src", str(i.root / "nope"), "--out", str(i.root / "out")],
                                               ["--src", "nope"])),
    Case("shard/src-empty", SHARD, lambda i: (["--src", str(i.folder("empty")), "--out", str(i.root / "out")],
                                             ["empty", "no video folders"])),
    Case("shard/out-holds-user-files", SHARD,
         lambda i: (["--src", str(i.videos), "--out", str(i.folder("mine", {"notes.txt": "mine"}))],
                    ["mine", "notes.txt"])),
    Case("shard/out-unwritable", SHARD,
         lambda i: (["--src", str(i.videos), "--out", str(i.needs_unwritable() / "out")], ["out"])),
    Case("verify/typo", SHARD, lambda i: (["--verify", str(i.root / "shardz")], ["shardz"]), absent=("--resume",)),
    Case("verify/truncated-shard", SHARD,
         lambda i: (["--verify", str(truncated(sorted(i.shard_copy().glob("train-*.tar"))[0], 3000).parent)],
                    ["problems in", "shards"]), code=1),
    # -- preview --------------------------------------------------------------------------------------
    Case("preview/unfinished-shards", PREVIEW,
         lambda i: (["--shards", str(i.folder("half")), "--out", str(i.root / "p.png"), "--device", "cpu"],
                    ["half", "manifest.json"])),
    Case("preview/out-unwritable", PREVIEW,
         lambda i: (["--shards", str(i.shards), "--out", str(i.needs_unwritable() / "p.png"), "--device", "cpu",
                     "--batches", "1", "--frames", "2", "--height", "64", "--width", "64", "--workers", "0"],
                    ["p.png"])),
    # -- the trainer: every row fails before torch is imported -----------------------------------------
    Case("train/typo-key", TRAIN, lambda i: (train_args(i, **{"experiment.optim.lrr": 1}),
                                            ["experiment.optim.lrr", "did you mean experiment.optim.lr"]),
         absent=("+experiment",)),
    Case("train/typo-key-added", TRAIN, lambda i: (train_args(i, **{"+experiment.optim.lrr": 1}),
                                                  ["experiment.optim.lrr", "did you mean experiment.optim.lr"])),
    Case("train/value-of-wrong-type", TRAIN, lambda i: (train_args(i, **{"experiment.optim.lr": "fast"}),
                                                       ["experiment.optim.lr", "fast"])),
    Case("train/value-out-of-range", TRAIN, lambda i: (train_args(i, **{"experiment.trainer.keep_checkpoints": 1}),
                                                      ["experiment.trainer.keep_checkpoints", "at least 2"])),
    Case("train/unknown-experiment", TRAIN, lambda i: (train_args(i, experiment="paper"),
                                                      ["experiment/paper", "paper_512x256"])),
    Case("train/mandatory-key-unset", TRAIN,
         lambda i: (train_args(i, experiment="paper_512x256", **{"experiment.data.shards": None}),
                    ["experiment.data.shards", "no default"])),
    Case("train/shards-missing", TRAIN, lambda i: (train_args(i, **{"experiment.data.shards": i.root / "nope"}),
                                                  ["experiment.data.shards", "no such folder", "nope"])),
    Case("train/shards-empty", TRAIN, lambda i: (train_args(i, **{"experiment.data.shards": i.folder("empty")}),
                                                ["empty", "manifest.json"])),
    Case("train/shards-truncated-manifest", TRAIN,
         lambda i: (train_args(i, **{"experiment.data.shards": truncated(i.shard_copy() / "manifest.json", 40).parent}),
                    ["manifest.json", "JSON"])),
    Case("train/pretrained-missing", TRAIN,
         lambda i: (train_args(i, **{"experiment.model.pretrained": i.root / "pipelines" / "tiny"}),
                    ["experiment.model.pretrained", "no such folder", "pipelines/tiny"]), absent=("huggingface",)),
    Case("train/output-dir-is-a-file", TRAIN, lambda i: (train_args(i, **{"experiment.output_dir": i.file("run")}),
                                                        ["experiment.output_dir", "is a file"])),
    Case("train/output-dir-unwritable", TRAIN,
         lambda i: (train_args(i, **{"experiment.output_dir": i.needs_unwritable() / "run"}),
                    ["experiment.output_dir", "cannot write"])),
    Case("train/resume-interrupted-checkpoint", TRAIN,
         lambda i: (train_args(i, **{"experiment.trainer.resume": i.folder("run/checkpoints/step-00000002",
                                                                           {".metadata": ""})}),
                    ["step-00000002", "not a complete checkpoint"])),
    # -- export ---------------------------------------------------------------------------------------
    Case("export/run-of-wrong-type", EXPORT,
         lambda i: (["--run", str(run_folder(i, config="- a list\n")), "--out", str(i.root / "out")],
                    ["config.yaml", "not the config.yaml of a training run"])),
    Case("export/checkpoint-interrupted", EXPORT,
         lambda i: (["--run", str(run_folder(i, checkpoints=("step-00000002",))), "--out", str(i.root / "out")],
                    ["no complete checkpoint", "step-00000002"])),
    Case("export/out-unwritable", EXPORT,
         lambda i: (["--run", str(run_folder(i)), "--out", str(i.needs_unwritable() / "out")],
                    ["out", "cannot write"])),
    # -- the conditioning cache ------------------------------------------------------------------------
    Case("precompute/out-unwritable", PRECOMPUTE,
         lambda i: (["--out", str(i.needs_unwritable() / "cache"), "experiment=tiny_cpu",
                     f"experiment.model.pretrained={i.pipeline}", f"experiment.data.shards={i.shards}"],
                    ["--out", "cache", "pick a folder you can write"])),
    # -- inpaint --------------------------------------------------------------------------------------
    Case("inpaint/video-truncated", INPAINT, lambda i: (inpaint_args(i, video=truncated_video(i)), ["clip.mp4"])),
    Case("inpaint/masks-of-wrong-size", INPAINT,
         lambda i: (inpaint_args(i, masks=i.frames("masks", 3, 64, 96, value=255)), ["00000.png", "64x96"])),
    Case("inpaint/model-missing", INPAINT, lambda i: (inpaint_args(i, **{"--model": i.root / "exports" / "mine"}),
                                                     ["exports/mine", "no such folder"]), absent=("huggingface",)),
    # -- evaluate -------------------------------------------------------------------------------------
    Case("evaluate/pred-of-other-aspect", EVALUATE,
         lambda i: (["--pred", str(i.frames("pred", 2, 120, 300)), "--gt", str(i.frames("gt", 2, 432, 240))],
                    ["120x300", "432x240"])),
    Case("evaluate/json-unwritable", EVALUATE,
         lambda i: (["--pred", str(i.frames("pred", 2, 64, 64)), "--gt", str(i.frames("gt", 2, 64, 64)),
                     "--json", str(i.needs_unwritable() / "s.json")], ["s.json", "cannot write"])),
    # -- make_tiny_pipeline and the quick start -------------------------------------------------------
    Case("tiny-pipeline/out-unwritable", TINY, lambda i: ([str(i.needs_unwritable() / "p")], ["cannot write"])),
    Case("quickstart/out-is-a-file", QUICKSTART, lambda i: (["--out", str(i.file("qs"))], ["--out", "is a file"])),
    Case("quickstart/steps-zero", QUICKSTART, lambda i: (["--out", str(i.root / "qs"), "--steps", "0"],
                                                        ["--steps 0"])),
    Case("quickstart/fresh-over-user-files", QUICKSTART,
         lambda i: (["--out", str(i.folder("qs", {"thesis.tex": "years"})), "--fresh"], ["thesis.tex", "--fresh"])),
]


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Path | None:
    """A folder this process cannot write into: a read-only one, or (root ignores permissions) /sys."""
    locked = tmp_path_factory.mktemp("locked")
    locked.chmod(0o555)
    for folder in (locked, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            return folder
    return None


def tree(folder: Path) -> dict[str, str]:
    """Every file (with its hash) and folder under `folder`: an empty folder left behind counts too."""
    return {**snapshot(folder), **{f"{p.relative_to(folder)}/": "" for p in folder.rglob("*") if p.is_dir()}}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gets_one_line_naming_it_and_changes_nothing(case, tiny_pipeline, synthetic_shards, unwritable,
                                                                tmp_path):
    inputs = Inputs(tmp_path / "user", tiny_pipeline, synthetic_shards, unwritable)
    inputs.root.mkdir()
    args, culprits = case.build(inputs)
    before = tree(tmp_path)
    proc = run_tool(*case.tool, *args, check=False)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR_PREFIXES) or ARGPARSE_ERROR.match(line)]
    assert len(errors) == 1, output[-3000:]
    assert all(c in errors[0] for c in culprits), errors[0]
    assert not any(a in errors[0] for a in case.absent), errors[0]
    assert proc.returncode == case.code, output[-3000:]
    assert tree(tmp_path) == before


def test_train_errors_are_torchruns_root_cause_before_anything_loads(tiny_pipeline, tmp_path):
    """Issue 17.6: torchrun's report ended in "Root Cause ... To enable traceback see: <url>" after ~9 s
    of model loading, our line buried above its traceback."""
    args = train_args(Inputs(tmp_path, tiny_pipeline, tmp_path / "nope", None))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "launch/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    message = f"error: config key 'experiment.data.shards' = '{tmp_path / 'nope'}': no such folder"
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert proc.returncode != 0 and f"traceback : {message}" in root_cause, proc.stderr[-3000:]
    printed = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(printed) == 1 and printed[0].startswith(message)  # by local rank 0 only
    assert "UNet" not in proc.stderr and not (tmp_path / "run").exists()  # no model built, no run folder
    print(f"torchrun with 2 processes reported the error in {time.monotonic() - start:.1f} s")


def test_tiny_cpu_paths_are_the_repositorys_from_any_folder(tmp_path, monkeypatch):
    """Issue 17.9: `experiment=tiny_cpu` named quickstart_out/... relative to the current folder, so from
    anywhere but the repository it trained on nothing (and suggested downloading the path from the Hub)."""
    from fff_vdi.config import compose_experiment

    monkeypatch.chdir(tmp_path)
    cfg, resolved = compose_experiment(REPO / "configs", ["experiment=tiny_cpu"])
    out = REPO / "quickstart_out"
    assert (cfg.model.pretrained, cfg.data.shards) == (str(out / "tiny_pipeline"), str(out / "shards"))
    assert cfg.output_dir == str(out / "runs" / "tiny_cpu") and str(out / "shards") in resolved


def test_config_yaml_records_no_key_the_schema_lacks(tmp_path):
    """Issue 17.2: `+experiment.optim.lrr=1` (Hydra's own hint for the typo) trained with the key ignored
    and recorded it in config.yaml; every key of every source is checked against the schema."""
    from fff_vdi.config import compose_experiment
    from fff_vdi.errors import ConfigError

    for override in ("+experiment.optim.lrr=1", "++experiment.trainer.max_step=5", "+seed=1"):
        with pytest.raises(ConfigError, match=rf"'{override.lstrip('+').split('=')[0]}'.*no such key"):
            compose_experiment(REPO / "configs", [override])
    configs = Path(shutil.copytree(REPO / "configs", tmp_path / "configs"))
    experiment = configs / "experiment" / "tiny_cpu.yaml"
    experiment.write_text(experiment.read_text().replace("  optim:\n", "  optim:\n    lrr: 1.0e-4\n"))
    with pytest.raises(ConfigError, match=r"experiment\.optim\.lrr.*did you mean experiment\.optim\.lr\b"):
        compose_experiment(configs, [])
