#!/usr/bin/env python
"""The trainer (launch/train.py) measured: the precomputed conditioning cache against online conditioning,
its time to the first step on a cold compile cache and after a restart, against the published recipe
and against bench/train_step.py in the same call.

    python bench/trainer_conditioning.py --out bench/results/trainer_conditioning_<card>.json
        [--runs online,cached] [--steps 40] [--compile off] [--batch 2] [--videos 24] [--frames 36]
        [--restart] [--published] [--step-bench]

Makes synthetic 720p videos and shards them (once, under --work), builds the cache with
tools/precompute_conditioning.py (once, eager frozen networks; its throughput goes to the results),
then trains `launch/train.py experiment=paper_512x256 model=svd_xt_random` (random weights) on every
GPU for --steps steps per run: `online` (RAFT, VAE and CLIP every step) and `cached` (experiment.data.
conditioning). Both runs read the frames the cache serves (data.crop=none, no flip), so they differ
only in the conditioning. Per run: the medians over the steps after --skip (step time, clips/s per
GPU, conditioning and UNet seconds, data wait) from metrics.jsonl, the peak memory, and
`first_step_wall_s`, the wall time from the trainer's launch to its first metrics line.

torch.compile's caches: every run compiles into one inductor cache folder under --work (a fresh one
with --cold, so the first run's figure is a first-ever compile). `--restart`: each run is then resumed
from its last checkpoint for --restart-steps more steps in a new, empty inductor cache folder (a
requeued job on another node), so only the artifacts the trainer saved beside its checkpoints can
spare it the compile; its `first_step_wall_s` is the restart's time to its first step.
`--published`: bench/train_step.py's published recipe first (the baseline of the speed-up).
`--step-bench`: bench/train_step.py for each run's own configuration after it (with `--conditioning
cached` for the cached run), for the trainer/benchmark ratio. Each run writes a new folder under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fff_vdi.utils.atomic import atomic_write_text  # noqa: E402 (standard library only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="more launch/train.py overrides for both runs and the cache")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--experiment", default="paper_512x256")
    p.add_argument("--model", default="svd_xt_random", help="configs/model/ group: the networks (default: SVD-XT "
                                                            "architecture, random weights)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_conditioning", help="videos, shards, cache, runs")
    p.add_argument("--runs", default="online,cached", help="comma-separated: online, cached")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="steps left out of the medians (compilation, warm-up)")
    p.add_argument("--compile", choices=("on", "off"), default="off", help="per-block compile of the UNet and the frozen networks")
    p.add_argument("--batch", type=int, default=2, help="clips per GPU")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=36, help="frames per synthetic video")
    p.add_argument("--video-size", default="1280x720", help="synthetic videos' WxH")
    p.add_argument("--cold", action="store_true", help="the first run compiles in a new, empty inductor cache")
    p.add_argument("--restart", action="store_true", help="resume each run on a new, empty inductor cache")
    p.add_argument("--restart-steps", type=int, default=10)
    p.add_argument("--published", action="store_true", help="bench/train_step.py's published recipe first")
    p.add_argument("--step-bench", action="store_true", help="bench/train_step.py with each run's configuration")
    return p.parse_args(argv)


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), cwd=REPO, check=True, env=env)


def run_trainer(cmd: list[str], metrics: Path, env: dict) -> float:
    """Run the trainer to its end; returns the wall seconds from its launch to its first new line in
    `metrics` (the first step of this process, compilation included)."""
    print("+", " ".join(map(str, cmd)), flush=True)
    lines_before = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    start = time.perf_counter()
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env)
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and len(metrics.read_text().splitlines()) > lines_before:
            first = time.perf_counter() - start
        time.sleep(0.2)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return first if first is not None else float("nan")


def inductor_env(work: Path, fresh: bool) -> dict:
    """The environment with torch.compile's caches in work/inductor, or in a new empty folder."""
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="inductor-fresh-", dir=work)) if fresh else work / "inductor"
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder)}


def torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]


def summarise(metrics: Path, skip: int) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = records[skip:] or records

    def median(key):
        return statistics.median(r[key] for r in timed)

    return {"steps": len(records), "timed_steps": len(timed), "first_step_s": records[0]["step_time_s"],
            "step_time_s": median("step_time_s"), "clips_per_s_per_gpu": None,
            "conditioning_s": median("conditioning_s"), "unet_s": median("unet_s"),
            "data_wait_share": median("data_wait_share"), "peak_memory_gib": max(r["peak_memory_gib"] for r in timed),
            "mfu": median("mfu") if "mfu" in timed[0] else None, "final_loss": records[-1]["loss"]}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    gpus = max(1, torch.cuda.device_count())
    work = args.work
    shards, cache = work / "shards", work / f"cache_{args.compile}"
    if not (shards / "manifest.json").is_file():
        workers = max(1, (os.cpu_count() or 2) - 1)
        width, height = args.video_size.split("x")
        run([sys.executable, "-m", "fff_vdi.data.synthetic", "--out", work / "videos", "--videos", args.videos,
             "--frames", args.frames, "--width", width, "--height", height, "--no-annotations", "--workers", workers])
        run([sys.executable, "tools/shard_ytvos.py", "--src", work / "videos", "--out", shards, "--workers", workers])
    compiled = "true" if args.compile == "on" else "false"
    common = [f"experiment={args.experiment}", f"model={args.model}",
              f"experiment.data.shards={shards}", "experiment.data.crop=none", "experiment.data.hflip_prob=0",
              f"experiment.data.batch_size={args.batch}", f"experiment.parallel.compile={compiled}",
              f"experiment.parallel.compile_frozen={compiled}", *args.overrides]
    results = {"command": " ".join(sys.argv), "gpus": gpus, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "batch_per_gpu": args.batch, "compile": args.compile, "steps": args.steps,
               "experiment": args.experiment, "model": args.model, "overrides": args.overrides,
               "data": {"videos": args.videos, "frames_per_video": args.frames, "source": f"synthetic {args.video_size}"},
               "runs": {}}
    runs = args.runs.split(",")

    def save() -> None:  # after every stage: a call cut by its time limit keeps what it measured, whole
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")

    if args.published:
        out = work / "published.json"
        run([sys.executable, "bench/train_step.py", "--config", "experiment=published_recipe", "--out", out],
            env=inductor_env(work, fresh=False))
        results["published"] = _step_bench_summary(out)
        save()
    if "cached" in runs:
        stats = work / f"precompute_{args.compile}.json"
        run([*torchrun(gpus), "tools/precompute_conditioning.py", "--out", cache, "--resume", "--stats-json", stats,
             *common, "experiment.parallel.compile_frozen=false"])
        results["precompute"] = json.loads(stats.read_text())
        save()
    for i, name in enumerate(runs):
        # A new folder per run: a run folder's compile artifacts would spare a later --cold run its compile.
        out_dir = Path(tempfile.mkdtemp(prefix=f"run_{name}_{args.compile}_b{args.batch}_", dir=work))
        train = [*torchrun(gpus), "launch/train.py", *common, f"experiment.output_dir={out_dir}",
                 "experiment.trainer.validate_every=0", "experiment.trainer.export_at_end=false",
                 "experiment.trainer.progress_bar=false", "experiment.trainer.log_every=5"]
        if name == "cached":
            train.append(f"experiment.data.conditioning={cache}")
        metrics = out_dir / "metrics.jsonl"
        first = run_trainer([*train, f"experiment.trainer.max_steps={args.steps}", "experiment.trainer.resume=none",
                             f"experiment.trainer.checkpoint_every={args.steps}"], metrics,
                            inductor_env(work, fresh=args.cold and i == 0))
        summary = summarise(metrics, args.skip)
        summary["first_step_wall_s"] = first
        summary["run_dir"] = str(out_dir)
        summary["clips_per_s_per_gpu"] = args.batch / summary["step_time_s"]
        results["runs"][name] = summary
        save()
        if args.restart:
            restart = run_trainer([*train, f"experiment.trainer.max_steps={args.steps + args.restart_steps}",
                                   "experiment.trainer.resume=auto", f"experiment.trainer.checkpoint_every={args.steps}"],
                                  metrics, inductor_env(work, fresh=True))
            records = [json.loads(line) for line in metrics.read_text().splitlines()][args.steps:]
            summary["restart"] = {"first_step_wall_s": restart, "steps": len(records),
                                  "first_step_s": records[0]["step_time_s"] if records else None,
                                  "step_time_s": statistics.median(r["step_time_s"] for r in records[1:]) if len(records) > 1 else None}
        if args.step_bench:
            out = out_dir / "step_bench.json"
            run([sys.executable, "bench/train_step.py", "--config", " ".join(common), "--conditioning", name,
                 "--out", out], env=inductor_env(work, fresh=False))
            summary["step_bench"] = _step_bench_summary(out)
            summary["trainer_over_step_bench"] = summary["clips_per_s_per_gpu"] / summary["step_bench"]["clips_per_s_per_gpu"]
        save()
    if {"online", "cached"} <= set(results["runs"]):
        r = results["runs"]
        results["cached_over_online_clips_per_s"] = r["cached"]["clips_per_s_per_gpu"] / r["online"]["clips_per_s_per_gpu"]
    if "published" in results:
        base = results["published"]["clips_per_s_per_gpu"]
        results["over_published_recipe"] = {name: r["clips_per_s_per_gpu"] / base for name, r in results["runs"].items()}
    save()
    print(json.dumps(results, indent=1))
    return 0


def _step_bench_summary(path: Path) -> dict:
    """bench/train_step.py's figures of its one configuration."""
    config = json.loads(path.read_text())["configs"][0]
    keys = ("name", "status", "step_s", "clips_per_s_per_gpu", "peak_memory_gib", "phases_s", "warmup_step_s", "unet_mfu")
    return {k: config.get(k) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
