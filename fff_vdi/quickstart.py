"""The whole system on an embedded default, end to end, in a few minutes on a laptop CPU:

  1. synthesise short videos (moving textured scenes, YouTube-VOS layout, with object annotations)
  2. shard them with tools/shard_ytvos.py (train/val split, verified)
  3. write a tiny random pipeline with tools/make_tiny_pipeline.py
  4. train it with torchrun (2 CPU processes, or every GPU) on experiment=tiny_cpu: checkpoints,
     TensorBoard logs, validation videos, and the exported pipeline
  5. inpaint a held-out video with the exported pipeline (python -m fff_vdi.inpaint)

    python -m fff_vdi.quickstart [--out quickstart_out] [--steps 40]

Every stage runs the command a user would run (printed before it runs); everything lands under --out.
Exit status: 0 done, 2 unusable arguments (one line), 1 a stage failed (its command is printed).
Scaling up is a change of configuration only: see README.md, "From the quick start to a real run".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fff_vdi.errors import FFFVDIError, InputError
from fff_vdi.utils.atomic import check_can_create

REPO = Path(__file__).resolve().parents[1]


class Stages:
    """Prints a header per stage, the command, and a stage-level progress bar."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="quickstart", unit="stage", position=0, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def run(self, title: str, cmd: list[str], env: dict | None = None) -> None:
        self.bar.set_description(f"quickstart: {title}")
        self.bar.write(f"\n== {title}\n$ {' '.join(cmd)}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            self.bar.close()
            raise SystemExit(f"quickstart: '{title}' failed (exit {proc.returncode}); the command is printed above")
        self.bar.write(f"   done in {time.perf_counter() - t0:.0f}s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def held_out_video(shards: Path) -> str:
    manifest = json.loads((shards / "manifest.json").read_text())
    index = json.loads((shards / manifest["splits"]["val"]["shards"][0]["index"]).read_text())
    return index["samples"][0]["video_id"]


# What the quick start writes into --out; --fresh deletes these and refuses a folder holding anything else.
OWN_OUTPUTS = ("videos", "shards", "tiny_pipeline", "runs", "inpainted")


def remove_own_outputs(out: Path) -> None:
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_OUTPUTS)
    if foreign:
        raise InputError(f"--fresh refused: {out} holds {foreign[:3]}, which the quick start did not "
                         f"write (it writes only {', '.join(OWN_OUTPUTS)}); give another --out")
    for name in OWN_OUTPUTS:
        if (out / name).exists():
            shutil.rmtree(out / name)


def check_arguments(args: argparse.Namespace) -> None:
    """Before the first stage: what would otherwise fail minutes later, in a stage's own process."""
    if args.steps < 1 or args.videos < 1:
        raise InputError(f"--steps {args.steps} --videos {args.videos}: use 1 or more of each")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file: give a folder (new, or an earlier quick start's)")
    check_can_create(args.out / OWN_OUTPUTS[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("quickstart_out"), help="everything is written here")
    ap.add_argument("--steps", type=int, default=40, help="training steps")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--fresh", action="store_true",
                    help="delete the quick start's own outputs in --out first (otherwise training resumes)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    try:
        check_arguments(args)
        if args.fresh:
            remove_own_outputs(out)
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    import torch

    gpus = torch.cuda.device_count()
    nproc = gpus if gpus > 0 else 2
    src, shards, pipeline = out / "videos", out / "shards", out / "tiny_pipeline"
    run_dir, result = out / "runs" / "tiny_cpu", out / "inpainted"

    stages = Stages(total=5)
    if not (src / "JPEGImages").is_dir():
        stages.run("1/5 synthesise videos", [py, "-m", "fff_vdi.data.synthetic", "--out", str(src), "--videos",
                                             str(args.videos), "--frames", "24", "--height", "144", "--width", "256"])
    else:
        stages.bar.update(1)
    if not (shards / "manifest.json").exists():
        stages.run("2/5 shard them", [py, "tools/shard_ytvos.py", "--src", str(src), "--out", str(shards),
                                      "--val-fraction", "0.25", "--with-annotations", "--workers", "2"])
    else:
        stages.bar.update(1)
    if not (pipeline / "model_index.json").exists():
        stages.run("3/5 tiny random pipeline", [py, "tools/make_tiny_pipeline.py", str(pipeline)])
    else:
        stages.bar.update(1)
    stages.run(f"4/5 train {args.steps} steps on {nproc} {'GPU' if gpus else 'CPU process'}(es)", [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "launch/train.py",
        "experiment=tiny_cpu", f"experiment.model.pretrained={pipeline}", f"experiment.data.shards={shards}",
        f"experiment.output_dir={run_dir}", f"experiment.trainer.max_steps={args.steps}",
        f"experiment.trainer.checkpoint_every={max(1, args.steps // 2)}",
        f"experiment.trainer.validate_every={max(1, args.steps // 2)}",
        *([] if gpus else ["experiment.data.backend=cpu"]),
    ], env={"OMP_NUM_THREADS": "1"} if not gpus else None)
    video_id = held_out_video(shards)
    stages.run(f"5/5 inpaint held-out video {video_id}", [
        py, "-m", "fff_vdi.inpaint", "--video", str(src / "JPEGImages" / video_id),
        "--masks", str(src / "Annotations" / video_id), "--model", str(run_dir / "pipeline"),
        "--out", str(result), "--steps", "4", "--height", "128", "--width", "224", "--raft-iters", "4",
        "--device", "cuda" if gpus else "cpu",
    ])
    stages.close()
    print(f"""
quickstart finished in {time.perf_counter() - stages.t0:.0f}s. Outputs:
  synthetic videos        {src}
  shards + manifest       {shards}  (report.json lists what was checked)
  tiny pipeline           {pipeline}
  training run            {run_dir}
    resolved config       {run_dir / 'config.yaml'}
    checkpoints (DCP)     {run_dir / 'checkpoints'}
    TensorBoard logs      {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})
    per-step metrics      {run_dir / 'metrics.jsonl'}
    validation videos     {run_dir / 'validation'}
    exported pipeline     {run_dir / 'pipeline'}
  inpainted video         {result}  (frames/, inpainted.mp4, comparison.mp4)
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
