"""Inpaint a video with a trained FFF-VDI pipeline.

    python -m fff_vdi.inpaint --video V --masks M --model DIR --out OUT [--steps 25] [--seed 0]
        [--height H --width W] [--window T --overlap K] [--device cuda|cpu] [--dtype bf16|fp32]
        [--offload auto|on|off] [--ff-chunking auto|on|off] [--decode-chunk N] [--gpu-memory GIB]

V: a folder of frames, a video file, or a YouTube-VOS/DAVIS root with --video-id ID (then --masks
defaults to the same root's Annotations/ID or Masks/ID). M: one mask image per frame (nonzero =
hole), one mask image for every frame (a logo or watermark), or a mask video
(`python -m fff_vdi.segment` makes masks from clicks). DIR: a pipeline folder in our layout or a
Hugging Face id.

Frames are resized for the model (default: the video's aspect ratio at 512x256's pixel count,
sides multiples of 8, at least 128; --height/--width override), inpainted in overlapping windows
(default: the UNet's num_frames, overlap a quarter of it), resized back, and composited: outside
the hole (grown by --mask-dilation pixels) every output pixel is the input pixel, bit for bit.
A video whose masks have no hole in any frame is an error (most likely the wrong masks or an
inverted convention), not a silent copy.

GPU memory (fff_vdi/inference/memory.py): by default the fastest settings whose estimated peak fits
the GPU (its memory times PyTorch's per-process fraction; --gpu-memory sets that cap): first as is,
then the UNet's feed-forward layers one frame at a time, then each network on the GPU only while
it runs (--offload), then fewer frames per VAE call (--decode-chunk). Frames stay on the host
between windows. Each setting can be forced.

OUT gets frames/00000.png ..., inpainted.mp4 and comparison.mp4 (input with the hole tinted |
output). Everything is written into OUT.tmp-xxxx first and renamed to OUT at the end, so OUT is
either complete or absent. Exit status: 0 done, 2 unusable input/weights (the message says what
to fix), 1 an I/O failure while writing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from fff_vdi.errors import InputError, run_command
from fff_vdi.inference.memory import GIB, MemoryPlan, network_bytes, plan_memory
from fff_vdi.inference.sampler import InpaintSampler
from fff_vdi.inference.video_io import (
    FrameSource,
    MaskSource,
    Mp4Writer,
    check_model_frame_size,
    check_same_length,
    composite,
    dilate_hole,
    model_frame_size,
    open_masks,
    open_video,
    overlay_hole,
    resize_hole,
    resize_rgb,
    side_by_side,
    to_uint8_rgb,
    write_png,
)
from fff_vdi.inference.windows import BLENDS, WindowCallback, WindowedInpainter, default_overlap, plan_windows
from fff_vdi.models import Components, load_components
from fff_vdi.utils.atomic import atomic_folder, check_output_folder

INPAINT_WRITER = "fff_vdi.inpaint"

DEFAULT_FPS = 24.0  # for frame folders (DAVIS is 24 fps)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
AUTO_SWITCH = {"auto": None, "on": True, "off": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_vdi.inpaint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="frame folder, video file, or dataset root (with --video-id)")
    p.add_argument("--video-id", help="video id inside a YouTube-VOS/DAVIS root (JPEGImages/<id>/)")
    p.add_argument("--masks", help="mask folder (one image per frame, nonzero = hole), one mask image for every frame, "
                                   "or a mask video; with --video-id defaults to the root's Annotations/<id> or Masks/<id>")
    p.add_argument("--model", required=True, help="pipeline folder (our layout) or Hugging Face id")
    p.add_argument("--raft", help="RAFT weights (raft-things.pth) when --model has no raft/ (a Hugging Face SVD id)")
    p.add_argument("--flow-completion", help="recurrent_flow_completion.pth when --model has no flow_completion/")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if an earlier inpaint wrote it (anything else is never replaced)")
    add_inference_options(p)
    return p


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """The sampling, size and memory options, shared with the web app (python -m fff_vdi.app)."""
    p.add_argument("--steps", type=int, default=25, help="denoising steps (the UNet runs 2x this per window)")
    p.add_argument("--height", type=int, help="model frame height (multiple of 8, >= 128)")
    p.add_argument("--width", type=int, help="model frame width (multiple of 8, >= 128)")
    p.add_argument("--window", type=int, help="frames per window (default: the UNet config's num_frames)")
    p.add_argument("--overlap", type=int, help="frames shared by consecutive windows (default: window // 4)")
    p.add_argument("--blend", choices=BLENDS, default=BLENDS[0],
                   help="how a window takes over from the one before in their overlap (fff_vdi/inference/windows.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of all noise (same seed, same output)")
    p.add_argument("--raft-iters", type=int, default=20, help="RAFT refinement iterations")
    p.add_argument("--mask-dilation", type=int, default=0, help="grow every hole by this many pixels first")
    p.add_argument("--fps", type=float, help=f"fps of the mp4s (default: the input video's, else {DEFAULT_FPS:g})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="network precision (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--offload", choices=sorted(AUTO_SWITCH), default="auto",
                   help="keep the networks on the host and move each to the GPU only while it runs (auto: when needed to fit)")
    p.add_argument("--ff-chunking", choices=sorted(AUTO_SWITCH), default="auto",
                   help="run the UNet's feed-forward layers one frame at a time: same result, less memory (auto: when needed)")
    p.add_argument("--decode-chunk", type=int, help="frames per VAE call (default: 8, fewer when needed to fit)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="GPU memory this process may use (caps PyTorch's allocator; default: the card's total)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: inpaint(args), writing=args.out)


def inpaint(args: argparse.Namespace, components: Components | None = None, progress: WindowCallback | None = None) -> Path:
    """Run the command. `components`: networks already loaded (on the host, in the run's dtype, see
    `inference_dtype`) instead of loading --model; `progress(window, windows, UNet calls done, per
    window)` instead of the terminal's progress bars."""
    out = Path(args.out)
    check_output_folder(out, INPAINT_WRITER, args.overwrite)
    if args.steps < 1 or args.raft_iters < 1 or args.mask_dilation < 0:
        raise InputError("--steps and --raft-iters must be >= 1 and --mask-dilation >= 0")
    device = inference_device(args.device)
    dtype = inference_dtype(device, args.dtype)

    video = open_video(args.video, args.video_id)
    masks = open_masks(args.masks or (args.video if args.video_id else None), args.video_id, num_frames=len(video))
    check_same_length(video, masks)
    size = model_size(args, video)
    frames_thwc, holes_thw = read_for_model(video, masks, size, args.mask_dilation)
    if not holes_thw.any():
        raise InputError(f"the masks in {masks.path} have no hole in any frame (all zero): nothing to inpaint; "
                         f"check that the masks are nonzero where the video should be filled")

    if components is None:  # on the host: the sampler puts each network where the memory plan says
        components = load_components(args.model, raft=args.raft, flow_completion=args.flow_completion, torch_dtype=dtype)
    window = args.window or components.unet.config.num_frames
    overlap = default_overlap(window) if args.overlap is None else args.overlap
    windows = plan_windows(len(video), window, overlap)
    plan = memory_plan(args, device, components, dtype, size, min(window, len(video)))
    sampler = InpaintSampler(components, num_steps=args.steps, raft_iters=args.raft_iters, dtype=dtype, device=device,
                             offload=plan.settings.offload, ff_chunking=plan.settings.ff_chunking,
                             decode_chunk=plan.settings.decode_chunk)
    print(f"{video.path}: {len(video)} frames of {video.width}x{video.height}, inpainted at {size[1]}x{size[0]} "
          f"in {len(windows)} window(s) of {window} frames (overlap {overlap}, {args.blend}), {args.steps} steps, {dtype}, {device}; "
          f"memory: {plan.describe()}", file=sys.stderr)

    reporter = contextlib.nullcontext(progress) if progress is not None else terminal_progress(len(windows), sampler.num_unet_calls)
    with reporter as on_step:
        inpainted = WindowedInpainter(sampler, window, overlap, args.blend)(frames_thwc, holes_thw, torch.Generator().manual_seed(args.seed), on_step)
        with atomic_folder(out, INPAINT_WRITER, args.overwrite) as tmp:
            write_outputs(tmp, video, masks, inpainted, args)
    return out


@contextlib.contextmanager
def terminal_progress(num_windows: int, calls_per_window: int) -> Iterator[WindowCallback]:
    """Two tqdm bars (windows, and UNet calls of the current window) fed by the inpainter's callback."""
    with tqdm(total=num_windows, desc="windows", position=0) as window_bar, \
            tqdm(total=calls_per_window, desc="UNet calls", position=1, leave=False) as step_bar:
        def on_step(index: int, windows: int, done: int, total: int) -> None:
            step_bar.n = done
            step_bar.refresh()
            if done == total:
                window_bar.update(1)
                step_bar.reset()

        yield on_step


def inference_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is visible to PyTorch; pass --device cpu (slow) or fix the CUDA setup")
    if device.type == "cuda" and device.index is None:  # per-device calls (the memory cap) need the index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def inference_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """--dtype, or bf16 on a GPU and float32 elsewhere."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def memory_plan(args: argparse.Namespace, device: torch.device, components: Components, dtype: torch.dtype,
                size: tuple[int, int], window: int) -> MemoryPlan:
    """--offload / --ff-chunking / --decode-chunk as given, the rest chosen to fit the GPU (see the docstring)."""
    budget = None
    if args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise InputError(f"--gpu-memory {args.gpu_memory}: give the GiB this process may use on the GPU, > 0")
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            budget = min(total, int(args.gpu_memory * GIB))
            torch.cuda.set_per_process_memory_fraction(budget / total, device)
    return plan_memory(device, network_bytes(components, dtype), size[0], size[1], window,
                       offload=AUTO_SWITCH[args.offload], ff_chunking=AUTO_SWITCH[args.ff_chunking],
                       decode_chunk=args.decode_chunk, budget_bytes=budget)


def model_size(args: argparse.Namespace, video: FrameSource) -> tuple[int, int]:
    """--height/--width, or the default fit; one of them alone keeps the aspect ratio."""
    if args.height is None and args.width is None:
        return model_frame_size(video.height, video.width)
    height = args.height or 8 * round(args.width * video.height / video.width / 8)
    width = args.width or 8 * round(args.height * video.width / video.height / 8)
    check_model_frame_size(height, width)
    return height, width


def read_for_model(video: FrameSource, masks: MaskSource, size: tuple[int, int], dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """All frames (uint8 (N, h, w, 3)) and holes (bool (N, h, w)) at the model's size; reading them
    all first also checks every file before anything is computed or written."""
    frames, holes = [], []
    for frame, hole in zip(video.frames(), masks.masks((video.height, video.width))):
        frames.append(resize_rgb(frame, size))
        holes.append(resize_hole(dilate_hole(hole, dilation), size))
    return np.stack(frames), np.stack(holes)


def write_outputs(tmp: Path, video: FrameSource, masks: MaskSource, inpainted: Iterator[tuple[int, np.ndarray]], args) -> None:
    """Composite each finished frame into the input at full resolution and write it three ways."""
    fps = args.fps or video.fps or DEFAULT_FPS
    (tmp / "frames").mkdir()
    full_size = (video.height, video.width)
    with Mp4Writer(tmp / "inpainted.mp4", fps, *full_size) as result_mp4, \
            Mp4Writer(tmp / "comparison.mp4", fps, video.height, 2 * video.width) as comparison_mp4:
        sources = zip(video.frames(), masks.masks(full_size), inpainted)
        for frame, hole, (index, generated) in sources:
            hole = dilate_hole(hole, args.mask_dilation)
            result = composite(frame, to_uint8_rgb(generated, full_size), hole)
            write_png(tmp / "frames" / f"{index:05d}.png", result)
            result_mp4.write(result)
            comparison_mp4.write(side_by_side(overlay_hole(frame, hole), result))


if __name__ == "__main__":
    sys.exit(main())
