"""Inference benchmark: the inpaint CLI's code path with a full-size random pipeline (SVD-XT
architecture, random weights built from the bundled configs, saved and loaded like a real one).

    PYTHONUNBUFFERED=1 python bench/inpaint.py --video DAVIS/JPEGImages/bmx-trees --masks DAVIS/Masks/bmx-trees \
        --out bench/results/inpaint_<card>.json [--model svd_xt] [--steps 25]

Runs (1) the whole video at 512x256 in overlapping 25-frame windows and (2) one 25-frame window at
1024x576, and reports wall time, seconds per window and peak GPU memory (max_memory_allocated) of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fff_vdi.inpaint import build_parser, inpaint  # noqa: E402
from fff_vdi.models.components import build_random_components, save_pipeline  # noqa: E402


def first_frames(folder: Path, n: int, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.iterdir())[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def timed_inpaint(cli: list[str], device: torch.device) -> dict:
    args = build_parser().parse_args(cli)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    inpaint(args)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"seconds": seconds, "peak_gib": peak, "cli": " ".join(cli)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="svd_xt", help="bundled config of the random pipeline (svd_xt, tiny)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--raft-iters", type=int, default=20)
    ap.add_argument("--sizes", default="256x512,576x1024", help="HxW of run 1 (whole video) and run 2 (one window)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fff_vdi_inpaint_bench_"))
    pipeline = work / "pipeline"
    t0 = time.perf_counter()
    components = build_random_components(args.model, seed=0, device=device, torch_dtype=dtype)
    save_pipeline(components, pipeline)
    window = components.unet.config.num_frames
    del components
    build_s = time.perf_counter() - t0
    print(f"random {args.model} pipeline built and saved in {build_s:.0f}s", flush=True)

    (h1, w1), (h2, w2) = (tuple(int(v) for v in s.split("x")) for s in args.sizes.split(","))
    common = ["--model", str(pipeline), "--steps", str(args.steps), "--raft-iters", str(args.raft_iters),
              "--device", device.type, "--overwrite"]
    num_frames = len(list(args.video.iterdir()))
    results = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "model": args.model, "dtype": str(dtype), "steps": args.steps, "raft_iters": args.raft_iters,
               "window": window, "pipeline_build_save_s": build_s}
    video_run = timed_inpaint(["--video", str(args.video), "--masks", str(args.masks), "--out", str(work / "out1"),
                               "--height", str(h1), "--width", str(w1), *common], device)
    results["whole_video"] = {"frames": num_frames, "height": h1, "width": w1, **video_run}
    print(json.dumps(results["whole_video"], indent=1), flush=True)
    clip = first_frames(args.video, window, work / "clip")
    clip_masks = first_frames(args.masks, window, work / "clip_masks")
    window_run = timed_inpaint(["--video", str(clip), "--masks", str(clip_masks), "--out", str(work / "out2"),
                                "--height", str(h2), "--width", str(w2), *common], device)
    results["one_window"] = {"frames": window, "height": h2, "width": w2, **window_run}
    print(json.dumps(results["one_window"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| run | frames | size | seconds | peak GiB |\n|---|---|---|---|---|")
    for name in ("whole_video", "one_window"):
        r = results[name]
        print(f"| {name} | {r['frames']} | {r['width']}x{r['height']} | {r['seconds']:.1f} | {r['peak_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
