"""Does inference fit a 24 GB GPU? Peak memory and seconds per frame of inpainting and of SAM2, with the
process capped like a 24 GB card (torch.cuda.set_per_process_memory_fraction).

    PYTHONUNBUFFERED=1 python bench/inpaint_memory.py --out bench/results/inpaint_memory_<card>.json \\
        [--cap-gib 24] [--sizes 256x512,576x1024] [--configs auto,offload,offload_decode2,ff,plain] [--steps 25]

Inpainting: SVD-XT-size networks with random weights (bundled config `svd_xt`), one window of
--frames frames (SVD-XT's 25) of a synthetic video with a moving object as the hole, through the
command's own code (`fff_vdi.inpaint.inpaint` with the networks loaded once, on the host), for each
memory configuration (fff_vdi/inference/memory.py):

    auto             what `python -m fff_vdi.inpaint` chooses for the cap
    plain            everything on the GPU, UNet feed-forward in one piece, 8 frames per VAE call
    ff               plain + the UNet's feed-forward layers one frame at a time
    offload          ff + each network on the GPU only while it runs
    offload_decode2  offload + 2 frames per VAE call

SAM2: random weights at the released sam2.1-hiera-tiny / -small sizes, one click on frame 0, propagated
through --sam-frames frames (`fff_vdi.inference.segmentation.VideoSegmenter`, bf16 on the GPU).

Reported per run: peak allocated and reserved GiB (the cap counts reserved memory), seconds, seconds per
frame, the estimate of fff_vdi/inference/memory.py for the settings, and "oom" when the cap was hit.
The JSON is rewritten after every run; runs stop starting after --time-budget-s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fff_vdi.data.synthetic import Scene  # noqa: E402
from fff_vdi.inference.memory import GIB, MemorySettings, estimate_peak_bytes, network_bytes, plan_memory  # noqa: E402
from fff_vdi.inference.video_io import write_png  # noqa: E402
from fff_vdi.inpaint import build_parser, inference_device, inference_dtype, inpaint  # noqa: E402
from fff_vdi.models import build_random_components  # noqa: E402
from fff_vdi.utils.atomic import atomic_write_json  # noqa: E402

CONFIGS = {
    "auto": {},
    "plain": MemorySettings(),
    "ff": MemorySettings(ff_chunking=True),
    "offload": MemorySettings(offload=True, ff_chunking=True),
    "offload_decode2": MemorySettings(offload=True, ff_chunking=True, decode_chunk=2),
}
SWITCH = {True: "on", False: "off"}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")]


def synthetic_clip(folder: Path, num_frames: int, height: int, width: int, seed: int = 0) -> tuple[Path, Path]:
    """PNG frames and masks (the scene's annotated objects, else its first shape) in folder/frames, folder/masks."""
    scene = Scene.random(np.random.default_rng([seed, 0]), num_frames, height, width)
    frames, masks = folder / "frames", folder / "masks"
    frames.mkdir(parents=True)
    masks.mkdir()
    for t in range(num_frames):
        rgb, labels = scene.render(t)
        write_png(frames / f"{t:05d}.png", rgb)
        write_png(masks / f"{t:05d}.png", np.repeat((labels > 0)[..., None] * 255, 3, axis=2).astype(np.uint8))
    return frames, masks


class PeakMemory:
    """Peak allocated / reserved GiB on a CUDA device inside the block (zeros elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated_gib = self.reserved_gib = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated_gib = torch.cuda.max_memory_allocated(self.device) / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved(self.device) / GIB
        self.seconds = time.perf_counter() - self.start


def inpaint_run(components, clip: tuple[Path, Path], size: tuple[int, int], config: str, args, device: torch.device, work: Path) -> dict:
    """One window through `fff_vdi.inpaint.inpaint` with the configuration's memory settings."""
    height, width = size
    settings = CONFIGS[config]
    cli = ["--video", str(clip[0]), "--masks", str(clip[1]), "--model", "unused: networks passed in", "--out", str(work / "out"),
           "--overwrite", "--height", str(height), "--width", str(width), "--steps", str(args.steps),
           "--raft-iters", str(args.raft_iters), "--device", device.type]
    if settings:
        cli += ["--offload", SWITCH[settings.offload], "--ff-chunking", SWITCH[settings.ff_chunking],
                "--decode-chunk", str(settings.decode_chunk)]
    budget = None
    if device.type == "cuda":  # the cap as the command's own budget (older PyTorch cannot read the fraction back)
        cli += ["--gpu-memory", str(args.cap_gib)]
        budget = int(min(args.cap_gib * GIB, torch.cuda.get_device_properties(device).total_memory))
    dtype = inference_dtype(device, None)
    weights = network_bytes(components, dtype)
    plan = plan_memory(device, weights, height, width, args.frames, budget_bytes=budget, **({} if not settings else {
        "offload": settings.offload, "ff_chunking": settings.ff_chunking, "decode_chunk": settings.decode_chunk}))
    record = {"config": config, "height": height, "width": width, "frames": args.frames, "settings": plan.settings.describe(),
              "estimate_gib": estimate_peak_bytes(weights, height, width, args.frames, plan.settings) / GIB}
    try:
        with PeakMemory(device) as peak:
            inpaint(build_parser().parse_args(cli), components=components, progress=lambda *a: None)
        record.update(oom=False, seconds=peak.seconds, seconds_per_frame=peak.seconds / args.frames,
                      peak_allocated_gib=peak.allocated_gib, peak_reserved_gib=peak.reserved_gib)
    except torch.OutOfMemoryError as e:
        record.update(oom=True, error=str(e).splitlines()[0][:300])
    return record


def sam2_run(architecture: str, size: tuple[int, int], num_frames: int, device: torch.device) -> dict:
    record = {"architecture": architecture, "height": size[0], "width": size[1], "frames": num_frames}
    try:
        from fff_vdi.inference.segmentation import Click, VideoSegmenter
        from fff_vdi.models.sam2 import build_random_sam2
    except ImportError as e:  # a transformers without Sam2VideoModel
        return {**record, "skipped": f"{type(e).__name__}: {e}"}
    model, processor = build_random_sam2(architecture, device=device)
    model = model.to(inference_dtype(device, None))
    scene = Scene.random(np.random.default_rng([1, 0]), num_frames, *size)
    frames = [scene.render(t)[0] for t in range(num_frames)]
    try:
        with PeakMemory(device) as peak:
            VideoSegmenter(model, processor)(frames, [[Click(size[1] / 2, size[0] / 2)]])
        record.update(oom=False, seconds=peak.seconds, seconds_per_frame=peak.seconds / num_frames,
                      peak_allocated_gib=peak.allocated_gib, peak_reserved_gib=peak.reserved_gib,
                      parameters_m=sum(p.numel() for p in model.parameters()) / 1e6)
    except torch.OutOfMemoryError as e:
        record.update(oom=True, error=str(e).splitlines()[0][:300])
    return record


def cap_memory(device: torch.device, cap_gib: float) -> dict:
    """Cap PyTorch's allocator on `device` at cap_gib (as a card of that size would, less its CUDA context)."""
    if device.type != "cuda":
        return {"card": "cpu", "cap_gib": None}
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    return {"card": torch.cuda.get_device_name(device), "total_gib": total / GIB, "cap_gib": cap_gib}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cap-gib", type=float, default=24.0, help="allocator cap, GiB (a 24 GB card)")
    ap.add_argument("--model", default="svd_xt", help="bundled config of the random networks (svd_xt, tiny)")
    ap.add_argument("--sizes", default="256x512,576x1024", help="HxW, comma-separated")
    ap.add_argument("--frames", type=int, default=25, help="frames of the clip: one window of SVD-XT")
    ap.add_argument("--configs", default="auto,offload,offload_decode2,ff,plain", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--raft-iters", type=int, default=20)
    ap.add_argument("--sam", default="sam2.1-hiera-tiny,sam2.1-hiera-small", help="SAM2 architectures ('' for none)")
    ap.add_argument("--sam-frames", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-budget-s", type=float, default=480, help="no run starts after this many seconds")
    args = ap.parse_args(argv)
    device = inference_device(args.device)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs {','.join(unknown)}: use {', '.join(CONFIGS)}")
    t0 = time.perf_counter()
    results = {**cap_memory(device, args.cap_gib), "torch": torch.__version__, "model": args.model, "steps": args.steps,
               "raft_iters": args.raft_iters, "command": " ".join(sys.argv), "sam2": [], "inpaint": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)

    sizes = parse_sizes(args.sizes)
    for architecture in filter(None, args.sam.split(",")):
        for size in sizes:
            results["sam2"].append(sam2_run(architecture, size, args.sam_frames, device))
            print(json.dumps(results["sam2"][-1]), flush=True)
            save()
    dtype = inference_dtype(device, None)
    # Built on the device (fast), then kept on the host like loaded weights: each run's plan places them.
    components = build_random_components(args.model, seed=0, device=device, torch_dtype=dtype)
    for name in ("unet", "vae", "image_encoder", "raft", "flow_completion"):
        torch.nn.Module.to(getattr(components, name), "cpu")
    with tempfile.TemporaryDirectory(prefix="fff_vdi_inpaint_memory_") as tmp:
        clips = {size: synthetic_clip(Path(tmp) / f"clip_{size[0]}x{size[1]}", args.frames, *size) for size in sizes}
        for config in configs:
            for size in sizes:
                if time.perf_counter() - t0 > args.time_budget_s:
                    results.setdefault("not_run", []).append(f"{config} {size[1]}x{size[0]}")
                    continue
                results["inpaint"].append(inpaint_run(components, clips[size], size, config, args, device, Path(tmp)))
                print(json.dumps(results["inpaint"][-1]), flush=True)
                save()
    save()
    print(markdown_table(results))
    return 0


def markdown_table(results: dict) -> str:
    lines = [f"cap {results['cap_gib']} GiB on {results['card']}", "",
             "| run | size | settings | peak GiB (reserved) | estimate GiB | s/frame |", "|---|---|---|---|---|---|"]
    for r in results["inpaint"]:
        peak = "out of memory" if r["oom"] else f"{r['peak_allocated_gib']:.1f} ({r['peak_reserved_gib']:.1f})"
        speed = "-" if r["oom"] else f"{r['seconds_per_frame']:.2f}"
        lines.append(f"| inpaint {r['config']} | {r['width']}x{r['height']} | {r['settings']} | {peak} | {r['estimate_gib']:.1f} | {speed} |")
    for r in results["sam2"]:
        if "skipped" in r:
            lines.append(f"| SAM2 {r['architecture']} | - | skipped: {r['skipped']} | | | |")
            continue
        peak = "out of memory" if r["oom"] else f"{r['peak_allocated_gib']:.1f} ({r['peak_reserved_gib']:.1f})"
        speed = "-" if r["oom"] else f"{r['seconds_per_frame']:.3f}"
        lines.append(f"| SAM2 {r['architecture']} | {r['width']}x{r['height']} | {r['frames']} frames | {peak} | - | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
