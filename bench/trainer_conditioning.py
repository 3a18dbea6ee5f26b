#!/usr/bin/env python
"""The trainer with the precomputed conditioning cache against the online conditioning, one machine.

    python bench/trainer_conditioning.py --out bench/results/trainer_conditioning_<card>.json
        [--runs online,cached] [--steps 40] [--compile off] [--batch 2] [--videos 24] [--frames 36]

Makes synthetic 720p videos and shards them (once, under --work), builds the cache with
tools/precompute_conditioning.py (once; its throughput goes to the results), then trains
`launch/train.py experiment=paper_512x256 model=svd_xt_random` (random weights) on every GPU for
--steps steps per run: `online` (RAFT, VAE and CLIP every step) and `cached` (experiment.data.
conditioning). Both runs read the frames the cache serves (data.crop=none, no flip), so they differ
only in the conditioning. Results: per run the medians over the steps after --skip (step time,
clips/s per GPU, conditioning and UNet seconds, data wait) from metrics.jsonl, the first step's time,
the peak memory, and the cached/online ratio of clips/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    return p.parse_args(argv)


def run(cmd: list[str]) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), cwd=REPO, check=True)


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
    results = {"gpus": gpus, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "batch_per_gpu": args.batch, "compile": args.compile, "steps": args.steps,
               "experiment": args.experiment, "model": args.model, "overrides": args.overrides,
               "data": {"videos": args.videos, "frames_per_video": args.frames, "source": f"synthetic {args.video_size}"},
               "runs": {}}
    runs = args.runs.split(",")
    if "cached" in runs:
        stats = work / f"precompute_{args.compile}.json"
        run([*torchrun(gpus), "tools/precompute_conditioning.py", "--out", cache, "--resume", "--stats-json", stats, *common])
        results["precompute"] = json.loads(stats.read_text())
    for name in runs:
        out_dir = work / f"run_{name}_{args.compile}"
        overrides = [*common, f"experiment.output_dir={out_dir}", f"experiment.trainer.max_steps={args.steps}",
                     "experiment.trainer.resume=none", "experiment.trainer.validate_every=0",
                     "experiment.trainer.export_at_end=false", "experiment.trainer.progress_bar=false",
                     f"experiment.trainer.checkpoint_every={args.steps}", "experiment.trainer.log_every=5"]
        if name == "cached":
            overrides.append(f"experiment.data.conditioning={cache}")
        run([*torchrun(gpus), "launch/train.py", *overrides])
        summary = summarise(out_dir / "metrics.jsonl", args.skip)
        summary["clips_per_s_per_gpu"] = args.batch / summary["step_time_s"]
        results["runs"][name] = summary
    if {"online", "cached"} <= set(results["runs"]):
        r = results["runs"]
        results["cached_over_online_clips_per_s"] = r["cached"]["clips_per_s_per_gpu"] / r["online"]["clips_per_s_per_gpu"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
