"""Masks for a whole video from a few clicks, with SAM2.

    python -m fff_vdi.segment --video V --points "x,y[,label][@frame]" ... [--points ...] --out MASKS
        [--sam facebook/sam2.1-hiera-tiny | FOLDER] [--dilation PX] [--device cuda|cpu] [--dtype bf16|fp32]

V: a folder of frames, a video file, or a YouTube-VOS/DAVIS root with --video-id ID. Each --points
is one object, with one or more clicks `x,y[,label][@frame]`: pixels from the top-left corner of the
frame, label 1 (on the object, default) or 0 (not on it), frame index from 0 (default 0). Example,
a person clicked on frame 0 and corrected on frame 40, and a ball:

    python -m fff_vdi.segment --video clip.mp4 --points 320,200 310,260,0@40 --points 90,400 --out masks/

SAM2 segments each object where it was clicked and propagates through every frame (forward and
backward), see fff_vdi/inference/segmentation.py. --sam: a Hugging Face id (downloaded on first use
into the Hugging Face cache; SAM2.1 hiera-tiny by default) or a folder written by save_pretrained.

MASKS gets one palette PNG per frame (named like the video's frames, else 00000.png ...; 0 =
background, k = object k), the layout `python -m fff_vdi.inpaint --masks MASKS` reads. --dilation
grows each object by that many pixels (inpainting wants the hole a little larger than the object:
its shadow, its blurred edge). MASKS is written whole or not at all. Exit status: 0 done, 2
unusable input or weights (the message says what to fix), 1 an I/O failure while writing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fff_vdi.errors import InputError, run_command
from fff_vdi.inference.segmentation import CLICK_SYNTAX, VideoSegmenter, check_clicks, dilate_labels, parse_click, write_label_masks
from fff_vdi.inference.video_io import FrameSource, open_video
from fff_vdi.inpaint import inference_device, inference_dtype
from fff_vdi.models.sam2 import DEFAULT_SAM2, load_sam2
from fff_vdi.utils.atomic import atomic_folder, check_output_folder

SEGMENT_WRITER = "fff_vdi.segment"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_vdi.segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="frame folder, video file, or dataset root (with --video-id)")
    p.add_argument("--video-id", help="video id inside a YouTube-VOS/DAVIS root (JPEGImages/<id>/)")
    p.add_argument("--points", nargs="+", action="append", required=True, metavar="CLICK",
                   help=f"the clicks of one object: {CLICK_SYNTAX}; repeat --points for more objects")
    p.add_argument("--out", required=True, help="mask folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if an earlier segment wrote it (anything else is never replaced)")
    p.add_argument("--sam", default=DEFAULT_SAM2, help=f"SAM2 weights: Hugging Face id or folder (default {DEFAULT_SAM2})")
    p.add_argument("--dilation", type=int, default=0, help="grow each object's mask by this many pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="SAM2's precision (default: bf16 on cuda, fp32 on cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: segment(args), writing=args.out)


def segment(args: argparse.Namespace) -> Path:
    """Everything is checked (clicks, video, weights) before the first frame is segmented."""
    out = Path(args.out)
    check_output_folder(out, SEGMENT_WRITER, args.overwrite)
    if args.dilation < 0:
        raise InputError(f"--dilation {args.dilation}: use 0 or more pixels")
    objects = [[parse_click(text) for text in clicks] for clicks in args.points]
    video = open_video(args.video, args.video_id)
    check_clicks(objects, len(video), video.height, video.width)
    device = inference_device(args.device)
    model, processor = load_sam2(args.sam, device=device, dtype=inference_dtype(device, args.dtype))
    print(f"{video.path}: {len(video)} frames of {video.width}x{video.height}, {len(objects)} object(s), SAM2 {args.sam} on {device}",
          file=sys.stderr)

    with tqdm(total=len(video), desc="SAM2 frames", unit="frame") as bar:
        def on_frame(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        labels = VideoSegmenter(model, processor)(video.frames(), objects, on_frame)
    labels = dilate_labels(labels, args.dilation)
    with atomic_folder(out, SEGMENT_WRITER, args.overwrite) as tmp:
        write_label_masks(tmp, labels, mask_names(video))
    covered = [float((labels == k).mean()) for k in range(1, len(objects) + 1)]
    print(f"wrote {len(labels)} masks to {out}; share of the frame per object: "
          + ", ".join(f"{k}: {share:.1%}" for k, share in enumerate(covered, start=1))
          + (f"; {int((~labels.any(axis=(1, 2))).sum())} frame(s) without any object" if not labels.any(axis=(1, 2)).all() else ""),
          file=sys.stderr)
    return out


def mask_names(video: FrameSource) -> list[str]:
    """The frames' own names for a folder of frames (so masks pair with frames by name), else 00000, 00001, ..."""
    return [f.stem for f in video.files] if video.files else [f"{i:05d}" for i in range(len(video))]


if __name__ == "__main__":
    sys.exit(main())
