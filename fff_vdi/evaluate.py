"""Score inpainted videos against their ground truth: PSNR, SSIM, E_warp, VFID.

    python -m fff_vdi.evaluate --pred P --gt G [--masks M] [--json OUT.json] [--size 432x240]
        [--raft raft-things.pth] [--i3d i3d_rgb_imagenet.pt] [--device cpu|cuda]

P and G are each one video (frame folder, video file, or an inpaint output folder) or a folder of
videos (also a YouTube-VOS/DAVIS root with JPEGImages/) matched by name. Every frame is resized to
--size (W x H, bicubic, as E2FGVI's test loader does) and scored as uint8 RGB over the whole frame;
PSNR and SSIM are averaged over all frames of all videos, E_warp over all frame pairs. With
--masks (one mask folder or a folder of them, matched by name) the PSNR inside the holes is
reported too. E_warp needs --raft and VFID needs --i3d and two or more videos; without them they
are reported as skipped, with the reason. Definitions: fff_vdi/eval/metrics.py. E_warp is
printed and stored x 10^3.

A prediction (or masks) of another size than its ground truth is resized to --size like the ground
truth when the aspect ratios agree within 3% (with a warning: resizing is the protocol); another
aspect ratio (a crop, a transposed or different video) is an error naming both sizes.

Exit status: 0 done, 2 unusable input or weights (the message says what to fix), 1 --json could not
be written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fff_vdi.errors import FFFVDIError, InputError
from fff_vdi.eval.metrics import (
    EWARP_SCALE,
    frechet_distance,
    i3d_feature,
    load_i3d,
    masked_psnr_per_frame,
    psnr_per_frame,
    ssim_per_frame,
    warping_error_per_pair,
)
from fff_vdi.inference.video_io import MASK_DIRS, FrameSource, MaskSource, find_videos, open_masks, open_video
from fff_vdi.models import load_raft
from fff_vdi.utils.atomic import atomic_write_json, check_can_create

# Relative difference of aspect ratios up to which a prediction or masks of another size than the
# ground truth are resized like it: E2FGVI's own resize of 854x480 DAVIS frames to 432x240 is 1.2%.
ASPECT_TOLERANCE = 0.03

PROTOCOL = {
    "psnr": "dB per frame over all pixels and RGB channels of uint8 frames, mean over all frames (identical frames: 100 dB)",
    "ssim": "65x65 uniform window, sample covariance, per RGB channel, data range 255 (E2FGVI/ProPainter: skimage win_size=65), mean over all frames",
    "ewarp_x1e3": "flow-warping error x 10^3: RAFT flow on the ground truth, predicted frame t+1 warped to t, squared error of [0, 1] RGB "
                  "over forward-backward consistent pixels, mean over all frame pairs",
    "vfid": "Frechet distance of I3D Mixed_5c features (one per video, frames in [0, 1]) between ground truth and prediction",
    "psnr_hole": "PSNR over the hole pixels only, mean over frames with a hole",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_vdi.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="predicted video or folder of videos")
    p.add_argument("--gt", required=True, help="ground-truth video or folder of videos (matched by name)")
    p.add_argument("--masks", help="mask folder or folder of mask folders (adds PSNR inside the holes)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--size", default="432x240", help="WxH every frame is resized to (default 432x240, the E2FGVI protocol)")
    p.add_argument("--raft", help="RAFT weights (raft-things.pth or a pipeline folder) for E_warp")
    p.add_argument("--raft-iters", type=int, default=20, help="RAFT iterations for E_warp")
    p.add_argument("--i3d", help="I3D weights (pytorch-i3d state dict or TorchScript) for VFID")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        try:
            atomic_write_json(args.json, results)
        except OSError as e:
            print(f"error: while writing --json {args.json}: {e}", file=sys.stderr)
            return 1
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'432x240' -> (H, W) = (240, 432)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r}: write it as WIDTHxHEIGHT, e.g. 432x240") from None
    if width < 11 or height < 11:
        raise InputError(f"--size {text}: SSIM needs at least 11x11 pixels")
    return height, width


def evaluate(args: argparse.Namespace) -> dict:
    size = parse_size(args.size)
    if args.json:
        check_can_create(args.json)  # before the scoring, not after it
    pairs = match_videos(args.pred, args.gt)
    masks = match_masks(args.masks, list(pairs)) if args.masks else {}
    device = torch.device(args.device)
    raft = load_raft(args.raft).to(device) if args.raft else None  # raft-things.pth, its folder or a pipeline
    i3d = load_i3d(args.i3d).to(device) if args.i3d else None

    videos, all_psnr, all_ssim, all_ewarp, all_hole, features = {}, [], [], [], [], ([], [])
    for name, (pred_path, gt_path) in pairs.items():
        pred_video, gt_video = open_video(pred_path), open_video(gt_path)
        check_comparable(name, "--pred", pred_video, gt_video, size)
        mask_source = open_masks(masks[name]) if name in masks else None
        if mask_source is not None:
            check_comparable(name, "--masks", mask_source, gt_video, size)
        pred, gt = read_resized(pred_video, size), read_resized(gt_video, size)
        if len(pred) != len(gt):
            raise InputError(f"video {name!r}: {pred_path} has {len(pred)} frames but {gt_path} has {len(gt)}: give both the same frames")
        psnr, ssim = psnr_per_frame(pred, gt), ssim_per_frame(pred, gt, device)
        row = {"frames": len(gt), "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
        all_psnr.append(psnr)
        all_ssim.append(ssim)
        if raft is not None:
            ewarp = warping_error_per_pair(pred, gt, raft, args.raft_iters, device)
            row["ewarp_x1e3"] = float(ewarp.mean() * EWARP_SCALE) if len(ewarp) else None
            all_ewarp.append(ewarp)
        if mask_source is not None:
            hole_psnr = masked_psnr_per_frame(pred, gt, read_holes(mask_source, size, len(gt)))
            row["psnr_hole"] = float(np.nanmean(hole_psnr)) if np.isfinite(hole_psnr).any() else None
            all_hole.append(hole_psnr)
        if i3d is not None:
            features[0].append(i3d_feature(i3d, gt, device))
            features[1].append(i3d_feature(i3d, pred, device))
        videos[name] = row

    summary = {
        "num_videos": len(videos),
        "num_frames": int(sum(len(p) for p in all_psnr)),
        "psnr": float(np.concatenate(all_psnr).mean()),
        "ssim": float(np.concatenate(all_ssim).mean()),
    }
    skipped = {}
    if raft is not None:
        summary["ewarp_x1e3"] = float(np.concatenate(all_ewarp).mean() * EWARP_SCALE)
    else:
        skipped["ewarp_x1e3"] = "no --raft given: E_warp needs RAFT weights (raft-things.pth, or a pipeline folder with raft/)"
    if all_hole:
        hole = np.concatenate(all_hole)
        summary["psnr_hole"] = float(np.nanmean(hole)) if np.isfinite(hole).any() else None
    if i3d is None:
        skipped["vfid"] = "no --i3d given: VFID needs I3D weights (i3d_rgb_imagenet.pt of pytorch-i3d, or a TorchScript I3D)"
    elif len(videos) < 2:
        skipped["vfid"] = f"VFID needs at least 2 videos (one I3D feature per video), got {len(videos)}"
    else:
        summary["vfid"] = frechet_distance(np.stack(features[0]), np.stack(features[1]))
    return {"size": [size[1], size[0]], "summary": summary, "skipped": skipped, "videos": videos, "protocol": PROTOCOL}


def match_videos(pred: str, gt: str) -> dict[str, tuple[Path, Path]]:
    """{name: (pred video, gt video)}: one video on each side pairs up; otherwise by name."""
    preds, gts = find_videos(pred, "--pred"), find_videos(gt, "--gt")
    if len(preds) == 1 and len(gts) == 1:
        (name, gt_path), (pred_path,) = next(iter(gts.items())), preds.values()
        return {name: (pred_path, gt_path)}
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise InputError(
            f"--pred {pred} and --gt {gt} do not hold the same videos (predictions missing for: {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}): name each predicted video like its ground truth"
        )
    return {name: (preds[name], gts[name]) for name in gts}


def match_masks(path: str, names: list[str]) -> dict[str, Path]:
    """{video name: mask folder or video}: one of each pairs up; otherwise by name."""
    found = find_videos(path, "--masks", MASK_DIRS)
    if len(found) == 1 and len(names) == 1:
        return {names[0]: next(iter(found.values()))}
    missing = [n for n in names if n not in found]
    if missing:
        raise InputError(f"--masks {path}: no masks for {', '.join(missing[:10])}: name each mask folder like its video")
    return {n: found[n] for n in names}


def check_comparable(name: str, flag: str, source: FrameSource | MaskSource, gt: FrameSource, size: tuple[int, int]) -> None:
    """A prediction or masks at another size than their ground truth: resized to --size like it (the
    protocol) when the aspect ratios agree, with a warning; an InputError naming both sizes when they
    do not (a crop, a transposed video or another video's masks would be scored without a word)."""
    if (source.height, source.width) == (gt.height, gt.width):
        return
    sizes = f"{flag} {source.path} is {source.width}x{source.height} but the ground truth {gt.path} is {gt.width}x{gt.height} (WxH)"
    if abs(math.log((source.width / source.height) / (gt.width / gt.height))) > math.log1p(ASPECT_TOLERANCE):
        raise InputError(f"video {name!r}: {sizes}, another aspect ratio: give it at the ground truth's size")
    print(f"warning: video {name!r}: {sizes}: both are resized to --size {size[1]}x{size[0]}, as the protocol resizes "
          "every frame", file=sys.stderr)


def read_resized(source: FrameSource, size: tuple[int, int]) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W, 3) at `size`, resized with PIL's bicubic filter."""
    frames = [
        frame if frame.shape[:2] == size else np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))
        for frame in source.frames()
    ]
    return np.stack(frames)


def read_holes(masks: MaskSource, size: tuple[int, int], num_frames: int) -> np.ndarray:
    if len(masks) != num_frames:
        raise InputError(f"--masks {masks.path} has {len(masks)} masks for a video of {num_frames} frames: give one mask per frame")
    return np.stack([
        hole if hole.shape == size else np.asarray(Image.fromarray(hole).resize((size[1], size[0]), Image.NEAREST))
        for hole in masks.masks((masks.height, masks.width), f"the first mask of {masks.path}")
    ])


def format_table(results: dict) -> str:
    columns = [("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("ewarp_x1e3", "E_warp x1e3", "{:.3f}"), ("psnr_hole", "PSNR hole", "{:.2f}")]
    shown = [c for c in columns if c[0] in results["summary"] or any(c[0] in v for v in results["videos"].values())]
    width = max([len("mean"), *map(len, results["videos"])])
    lines = [f"{'video':<{width}}  {'frames':>6}  " + "  ".join(f"{title:>11}" for _, title, _ in shown)]

    def row(name: str, frames: int, values: dict) -> str:
        cells = [(fmt.format(values[key]) if values.get(key) is not None else "-") for key, _, fmt in shown]
        return f"{name:<{width}}  {frames:>6}  " + "  ".join(f"{c:>11}" for c in cells)

    lines += [row(name, v["frames"], v) for name, v in results["videos"].items()]
    summary = results["summary"]
    lines.append(row("mean", summary["num_frames"], summary))
    lines.append(f"size {results['size'][0]}x{results['size'][1]}; VFID: " + (f"{summary['vfid']:.4f}" if "vfid" in summary else "skipped"))
    lines += [f"skipped {key}: {reason}" for key, reason in results["skipped"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
