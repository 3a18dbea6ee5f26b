"""Do consecutive windows jump? The temporal warping error (E_warp) of frame pairs across window borders
against pairs inside windows, for each way windows blend (fff_vdi/inference/windows.py).

    PYTHONUNBUFFERED=1 python bench/seams.py --model PIPELINE --video ../shared/data/davis-sample \\
        --video-id bmx-trees --out bench/results/seams_<card>.json [--blends crossfade,keep,handover] \\
        [--window 25 --overlap 6] [--steps 25] [--height 256 --width 512] [--ewarp-raft raft-things.pth]

Each blend inpaints the whole video through the command's own code (`fff_vdi.inpaint.inpaint`, the
networks loaded once, the same seed). E_warp of pair (t, t+1), as fff_vdi/eval/metrics.py defines it,
with RAFT flows of the output itself (an object-removal video has no ground truth to take them from),
over the hole of frame t (where the windows' outputs differ; outside it every output is the input)
and over the whole frame. A pair is at a border when t + 1 lies in a window's transition: from its
first overlap frame to its first frame no earlier window covered (start ... start + num_known);
inside otherwise. A seam shows as border E_warp above inside E_warp (ratio > 1).

The E_warp RAFT is --ewarp-raft, else the pipeline's raft/ (random in a tiny pipeline: then the
numbers only show that the script runs). Results: JSON (rewritten after each blend) and a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fff_vdi.eval.metrics import EWARP_SCALE, warping_error_per_pair  # noqa: E402
from fff_vdi.inference.video_io import open_masks, open_video, read_rgb  # noqa: E402
from fff_vdi.inference.windows import BLENDS, default_overlap, plan_windows  # noqa: E402
from fff_vdi.inpaint import build_parser, inference_device, inference_dtype, inpaint  # noqa: E402
from fff_vdi.models import load_components, load_raft  # noqa: E402
from fff_vdi.utils.atomic import atomic_write_json  # noqa: E402


def border_pairs(num_frames: int, window: int, overlap: int) -> np.ndarray:
    """bool (num_frames - 1,): pair (t, t + 1) is at a border when t + 1 is in [start, start + num_known]
    of a window after the first."""
    border = np.zeros(num_frames - 1, bool)
    for w in plan_windows(num_frames, window, overlap)[1:]:
        border[max(w.start - 1, 0): w.start + w.num_known] = True
    return border


def summarise(per_pair: np.ndarray, border: np.ndarray) -> dict:
    """Means x 1e3 at the borders, inside, over all pairs (NaN pairs, without any pixel, left out)."""
    def mean(values: np.ndarray) -> float | None:
        values = values[~np.isnan(values)]
        return float(values.mean() * EWARP_SCALE) if len(values) else None

    out = {"border": mean(per_pair[border]), "inside": mean(per_pair[~border]), "all": mean(per_pair)}
    out["ratio"] = out["border"] / out["inside"] if out["border"] is not None and out["inside"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="pipeline folder or Hugging Face id")
    ap.add_argument("--video", required=True, help="frame folder, video file, or dataset root (with --video-id)")
    ap.add_argument("--video-id")
    ap.add_argument("--masks", help="default: the dataset root's masks of --video-id")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--blends", default=",".join(BLENDS), help=f"of {', '.join(BLENDS)}")
    ap.add_argument("--window", type=int, help="frames per window (default: the UNet's num_frames)")
    ap.add_argument("--overlap", type=int, help="default: window // 4")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--raft-iters", type=int, default=20, help="RAFT iterations of the inpainting")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ewarp-raft", help="RAFT weights for E_warp (default: the pipeline's raft/)")
    ap.add_argument("--ewarp-iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, help="where each blend's inpainted video is written (default: --out without .json)")
    args = ap.parse_args(argv)
    blends = args.blends.split(",")
    if unknown := [b for b in blends if b not in BLENDS]:
        ap.error(f"--blends {','.join(unknown)}: use {', '.join(BLENDS)}")
    device = inference_device(args.device)
    components = load_components(args.model, torch_dtype=inference_dtype(device, None))
    window = args.window or components.unet.config.num_frames
    overlap = default_overlap(window) if args.overlap is None else args.overlap
    raft = load_raft(args.ewarp_raft or args.model).to(device).eval()

    video = open_video(args.video, args.video_id)
    masks = open_masks(args.masks or (args.video if args.video_id else None), args.video_id, num_frames=len(video))
    holes = np.stack(list(masks.masks((video.height, video.width))))
    border = border_pairs(len(video), window, overlap)
    workdir = args.workdir or args.out.with_suffix("")
    results = {"video": str(video.path), "frames": len(video), "window": window, "overlap": overlap, "steps": args.steps,
               "windows": [[w.start, w.stop, w.num_known] for w in plan_windows(len(video), window, overlap)],
               "border_pairs": border.astype(int).tolist(), "command": " ".join(sys.argv), "blends": {}}
    for blend in blends:
        cli = ["--video", args.video, "--model", args.model, "--out", str(workdir / blend), "--overwrite", "--blend", blend,
               "--window", str(window), "--overlap", str(overlap), "--steps", str(args.steps), "--raft-iters", str(args.raft_iters),
               "--seed", str(args.seed), "--device", device.type]
        cli += (["--video-id", args.video_id] if args.video_id else []) + (["--masks", args.masks] if args.masks else [])
        cli += (["--height", str(args.height)] if args.height else []) + (["--width", str(args.width)] if args.width else [])
        t0 = time.perf_counter()
        out = inpaint(build_parser().parse_args(cli), components=components)
        seconds = time.perf_counter() - t0
        frames = np.stack([read_rgb(p) for p in sorted((out / "frames").glob("*.png"))])
        hole_pairs = warping_error_per_pair(frames, frames, raft, args.ewarp_iters, device, region=holes)
        frame_pairs = warping_error_per_pair(frames, frames, raft, args.ewarp_iters, device)
        results["blends"][blend] = {
            "seconds": seconds, "hole": summarise(hole_pairs, border), "frame": summarise(frame_pairs, border),
            "per_pair_hole_x1e3": [None if np.isnan(v) else v * EWARP_SCALE for v in hole_pairs],
            "per_pair_frame_x1e3": (frame_pairs * EWARP_SCALE).tolist(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)
        print(f"{blend}: {results['blends'][blend]['hole']} (hole), {seconds:.0f} s", flush=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    def cell(value: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [f"{results['frames']} frames, windows of {results['window']} (overlap {results['overlap']}): "
             f"{sum(results['border_pairs'])} border pairs; E_warp x 1e3",
             "| blend | hole: border | hole: inside | hole: ratio | frame: border | frame: inside | frame: ratio |",
             "|---|---|---|---|---|---|---|"]
    for blend, r in results["blends"].items():
        lines.append(f"| {blend} | {cell(r['hole']['border'])} | {cell(r['hole']['inside'])} | {cell(r['hole']['ratio'], '{:.2f}')} | "
                     f"{cell(r['frame']['border'])} | {cell(r['frame']['inside'])} | {cell(r['frame']['ratio'], '{:.2f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
