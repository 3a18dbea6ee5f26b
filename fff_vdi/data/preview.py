"""Look at what the trainer will see: a grid of clip frames with the masks overlaid, and statistics.

    python -m fff_vdi.data.preview --shards DIR --out preview.png [--batches N] [--json stats.json]
                                   [--device cpu|gpu] [--frames T --height H --width W --batch-size B]
                                   [--masks rectangles|freeform|objects|mixed]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fff_vdi.config import DataConfig, MaskConfig, validate_data
from fff_vdi.data.loader import ClipLoader
from fff_vdi.errors import FFFVDIError
from fff_vdi.utils.atomic import atomic_open, atomic_write_json
from fff_vdi.utils.paths import os_error_text, unwritable_reason

MASK_PRESETS = {
    "rectangles": dict(rectangles=1.0, freeform=0.0, objects=0.0),
    "freeform": dict(rectangles=0.0, freeform=1.0, objects=0.0),
    "objects": dict(rectangles=0.0, freeform=0.0, objects=1.0),
    "mixed": dict(rectangles=0.4, freeform=0.4, objects=0.2),
}


def overlay(clip_tchw: torch.Tensor, mask_t1hw: torch.Tensor, columns: int) -> np.ndarray:
    """One row: `columns` evenly spaced frames, holes tinted red."""
    T = clip_tchw.shape[0]
    idx = np.linspace(0, T - 1, num=min(columns, T)).round().astype(int)
    rgb = ((clip_tchw[idx].float().cpu() + 1) * 127.5).clamp(0, 255)
    m = mask_t1hw[idx].float().cpu()
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    rgb = rgb * (1 - 0.5 * m) + red * 0.5 * m
    return torch.cat(list(rgb.permute(0, 2, 3, 1)), dim=1).to(torch.uint8).numpy()


def mask_statistics(ratios: list[float]) -> dict:
    q = np.percentile(np.asarray(ratios), [0, 5, 25, 50, 75, 95, 100]).tolist()
    return dict(zip(["min", "p5", "p25", "p50", "p75", "p95", "max"], q))


def run(cfg: DataConfig, out_png: str, batches: int, device: torch.device, columns: int = 8) -> dict:
    loader = ClipLoader(cfg, device=device)
    rows, ratios, kinds = [], [], {}
    lo, hi = float("inf"), float("-inf")
    shapes = {}
    next(loader)  # warm-up (worker start, decoder init) outside the timing
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(loader)
        shapes = {k: list(b[k].shape) for k in ("pixel_values", "mask_values")}
        lo, hi = min(lo, b["pixel_values"].min().item()), max(hi, b["pixel_values"].max().item())
        ratios += b["mask_values"].mean(dim=(1, 2, 3, 4)).tolist()
        for k in b["mask_kinds"]:
            kinds[k] = kinds.get(k, 0) + 1
        rows += [overlay(c, m, columns) for c, m in zip(b["pixel_values"], b["mask_values"])]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    loader.close()
    with atomic_open(out_png, "wb") as f:
        Image.fromarray(np.concatenate(rows, axis=0)).save(f, format="PNG")
    clips = batches * cfg.batch_size
    return {
        "shards": cfg.shards, "split": cfg.split, "backend": loader.backend, "device": str(device),
        "batches": batches, "clips": clips, "shapes": shapes, "value_range": [lo, hi],
        "mask_ratio": mask_statistics(ratios), "mask_kinds": kinds,
        "clips_per_s": clips / seconds, "frames_per_s": clips * cfg.num_frames / seconds,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="folder with manifest.json (tools/shard_ytvos.py)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--json", help="write the statistics here too")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--split", default="train")
    ap.add_argument("--frames", type=int, default=DataConfig.num_frames)
    ap.add_argument("--height", type=int, default=DataConfig.height)
    ap.add_argument("--width", type=int, default=DataConfig.width)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--masks", choices=sorted(MASK_PRESETS), default="rectangles")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=DataConfig.seed)
    args = ap.parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        ap.error("--device gpu: no CUDA device is visible; use --device cpu")
    if args.batches < 1:
        ap.error(f"--batches {args.batches}: use 1 or more")
    for flag, path in (("--out", args.out), ("--json", args.json)):
        problem = path and ("is a folder" if Path(path).is_dir() else unwritable_reason(Path(path).parent))
        if problem:  # found before minutes of loading, not after
            ap.error(f"{flag} {path}: {problem}; give a file path you can write")
    masks = replace(MaskConfig(), **MASK_PRESETS[args.masks])
    cfg = DataConfig(shards=args.shards, split=args.split, num_frames=args.frames, height=args.height,
                     width=args.width, batch_size=args.batch_size, masks=masks, num_workers=args.workers,
                     seed=args.seed, short_video_policy="reflect_pad")
    try:
        validate_data(cfg, prefix="preview")
        stats = run(cfg, args.out, args.batches, torch.device("cuda" if args.device == "gpu" else "cpu"))
        if args.json:
            atomic_write_json(args.json, stats)
    except FFFVDIError as e:
        print(f"preview: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"preview: {os_error_text(e, args.out)}; check that --shards can be read and --out and --json "
              "written", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
