"""Data pipeline benchmark: our loader (DALI on the GPU, or the PIL backend) against the published
loader's approach (PIL decode + resize of whole frames in torch DataLoader workers), on 720p clips
resized to 512x256, in one run on one card.

    PYTHONUNBUFFERED=1 python bench/data.py --out bench/results/data_<card>.json \
        [--videos 32 --frames 40] [--batches 30] [--cores 4] [--baseline-workers 4]

Reports frames/s, CPU cores busy (CPU seconds of the process tree / wall seconds), frames/s per busy
core, and host memory (RSS of the process tree). Our pipeline runs pinned to `--cores` CPU cores (the
issue's limit); the baseline gets the cores it needs for `--baseline-workers` workers.

`--variants` measures more settings of our pipeline in the same run, each a ':'-joined list of
overrides (workers, threads, hw, prefetch, batch, cores, stage), for example
`--variants workers=4:threads=4 hw=1.0 stage=pipeline stage=source`. Stages: `loader` (the training
loader: DALI, then masks and jitter; the default), `pipeline` (the DALI pipeline alone) and `source`
(the reader callable alone, in this process: what one reader core delivers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fff_vdi.config import DataConfig, MaskConfig  # noqa: E402
from fff_vdi.data.loader import ClipLoader  # noqa: E402


def process_tree_usage() -> tuple[float, float]:
    """(CPU seconds, RSS GiB) of this process and all its descendants (psutil)."""
    import psutil

    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return cpu, rss / 2**30


def measure(batches, num_batches: int, frames_per_batch: int, device: torch.device) -> dict:
    next(batches)  # warm-up: workers and decoders start outside the timing
    next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu0, _ = process_tree_usage()
    t0 = time.perf_counter()
    peak_rss = 0.0
    for i in range(num_batches):
        next(batches)
        if i % 5 == 0:
            peak_rss = max(peak_rss, process_tree_usage()[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu1, rss = process_tree_usage()
    cores = (cpu1 - cpu0) / wall
    fps = num_batches * frames_per_batch / wall
    return {"frames_per_s": fps, "cpu_cores_busy": cores, "frames_per_s_per_core": fps / max(cores, 1e-9),
            "host_rss_gib": max(peak_rss, rss), "seconds": wall, "batches": num_batches}


def data_config(shards: Path, args, backend: str) -> DataConfig:
    return DataConfig(shards=str(shards), num_frames=args.frames_per_clip, height=256, width=512,
                      batch_size=args.batch_clips, frame_steps=[1, 2], masks=MaskConfig(),
                      num_workers=args.reader_workers, decoder_threads=args.decoder_threads,
                      hw_decoder_load=args.hw_decoder_load, prefetch=args.prefetch,
                      short_video_policy="smaller_step", backend=backend)


def ours(shards: Path, args, device: torch.device, backend: str, stage: str = "loader") -> dict:
    cfg = data_config(shards, args, backend)
    frames_per_batch = args.batch_clips * args.frames_per_clip
    if stage == "source":
        return source_rate(cfg)
    loader = ClipLoader(cfg, device=device)
    try:
        if stage == "pipeline":  # the backend's decoding alone, without ClipLoader's masks and jitter
            from fff_vdi.data.sampler import RankSlice

            rank_slice = RankSlice(0, 0, 1, cfg.batch_size)
            if loader.backend == "dali":
                from fff_vdi.data.dali_loader import dali_batches

                batches = dali_batches(loader.source, rank_slice, device)
            else:
                from fff_vdi.data.cpu_loader import cpu_batches

                batches = cpu_batches(loader.source, rank_slice, cfg.num_workers, cfg.prefetch)
            try:
                return measure(batches, args.batches, frames_per_batch, device)
            finally:
                if hasattr(batches, "close"):  # DALI's generator (a DataLoader iterator has no close)
                    batches.close()
        return measure(loader, args.batches, frames_per_batch, device)
    finally:
        loader.close()


def source_rate(cfg: DataConfig, samples: int = 48) -> dict:
    """The DALI reader callable (plan + pread of the window's JPEG bytes) run in this process."""
    from fff_vdi.data.clips import ClipSource
    from fff_vdi.data.dali_loader import _ExternalSource
    from fff_vdi.data.sampler import RankSlice
    from fff_vdi.data.shards import ShardSet

    source = ClipSource(ShardSet.open(cfg.shards, cfg.split, verify_crc=cfg.verify_crc), cfg)
    call = _ExternalSource(source, RankSlice(0, 0, 1, cfg.batch_size), with_labels=False)

    class Info:
        def __init__(self, i):
            self.idx_in_epoch = i

    call(Info(0))
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(1, samples + 1):
        call(Info(i))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    fps = samples * cfg.num_frames / wall
    return {"frames_per_s": fps, "cpu_cores_busy": cpu / wall, "frames_per_s_per_core": fps / max(cpu / wall, 1e-9),
            "host_rss_gib": None, "seconds": wall, "samples": samples}


VARIANT_KEYS = {"workers": ("reader_workers", int), "threads": ("decoder_threads", int),
                "hw": ("hw_decoder_load", float), "prefetch": ("prefetch", int), "batch": ("batch_clips", int),
                "cores": ("cores", int), "stage": ("stage", str)}


def parse_variant(text: str, args) -> argparse.Namespace:
    """A copy of `args` with a variant's overrides, e.g. 'workers=4:hw=1.0:stage=pipeline'."""
    variant = argparse.Namespace(**vars(args), stage="loader", name=text)
    for item in filter(None, text.split(":")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise SystemExit(f"--variants {text!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(VARIANT_KEYS)}")
        attr, kind = VARIANT_KEYS[key]
        try:
            setattr(variant, attr, kind(value))
        except ValueError:
            raise SystemExit(f"--variants {text!r}: {key} takes a {kind.__name__}, not {value!r}") from None
    if variant.stage not in ("loader", "pipeline", "source"):
        raise SystemExit(f"--variants {text!r}: stage must be loader, pipeline or source")
    return variant


def run_ours(shards: Path, args, device: torch.device, backend: str, stage: str = "loader") -> dict:
    """`ours` pinned to args.cores CPU cores (children, such as DALI's reader workers, inherit it)."""
    all_cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(all_cores[:args.cores]))
    settings = {"backend": backend, "stage": stage, "cores_allowed": args.cores, "batch_clips": args.batch_clips,
                "reader_workers": args.reader_workers, "decoder_threads": args.decoder_threads,
                "hw_decoder_load": args.hw_decoder_load, "prefetch": args.prefetch}
    try:
        return {**settings, **ours(shards, args, device, backend, stage)}
    except Exception as e:  # keep the run's other results
        return {**settings, "error": repr(e)}
    finally:
        os.sched_setaffinity(0, set(all_cores))


class PublishedClips(torch.utils.data.Dataset):
    """The published InpaintDataset's work per clip: PIL open + whole-frame resize + to tensor, plus
    the moving-rectangle masks drawn with PIL (simplified to a static box: its cost is small)."""

    def __init__(self, root: Path, frames: int, height: int, width: int):
        self.videos = sorted(p for p in (root / "JPEGImages").iterdir() if p.is_dir())
        self.frames, self.height, self.width = frames, height, width

    def __len__(self):
        return 10**6

    def __getitem__(self, idx):
        from PIL import Image

        rng = np.random.default_rng(idx)
        video = self.videos[idx % len(self.videos)]
        names = sorted(os.listdir(video))
        start = int(rng.integers(0, len(names) - self.frames + 1))
        pixels = torch.empty(self.frames, 3, self.height, self.width)
        for i, name in enumerate(names[start:start + self.frames]):
            img = Image.open(video / name).resize((self.width, self.height))
            pixels[i] = torch.from_numpy(np.asarray(img)).float().permute(2, 0, 1) / 127.5 - 1
        masks = torch.zeros(self.frames, 1, self.height, self.width)
        masks[:, :, 64:192, 128:384] = 1
        return {"pixel_values": pixels, "mask_values": masks}


def baseline(src: Path, args, device: torch.device) -> dict:
    loader = torch.utils.data.DataLoader(PublishedClips(src, args.frames_per_clip, 256, 512),
                                         batch_size=args.batch_clips, num_workers=args.baseline_workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=2)

    def batches():
        for b in loader:
            yield b["pixel_values"].to(device, non_blocking=True), b["mask_values"].to(device, non_blocking=True)

    return measure(batches(), max(4, args.batches // 4), args.batch_clips * args.frames_per_clip, device)


def make_dataset(root: Path, args) -> tuple[Path, Path]:
    from fff_vdi.data.synthetic import write_synthetic_videos

    src, shards = root / "src", root / "shards"
    if (shards / "manifest.json").exists():  # a set from an earlier run in --workdir
        return src, shards
    t0 = time.perf_counter()
    write_synthetic_videos(src, num_videos=args.videos, num_frames=args.frames, height=720, width=1280, seed=0,
                           with_annotations=False, workers=min(8, os.cpu_count() or 1))
    print(f"synthetic 720p set: {args.videos} videos x {args.frames} frames in {time.perf_counter() - t0:.0f}s", flush=True)
    import subprocess

    subprocess.run([sys.executable, "tools/shard_ytvos.py", "--src", str(src), "--out", str(shards),
                    "--workers", str(min(8, os.cpu_count() or 1)), "--shard-size", "256MB"],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    return src, shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, help="where to write the synthetic set (default: a temp folder)")
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--frames", type=int, default=40, help="frames per synthetic video")
    ap.add_argument("--frames-per-clip", type=int, default=25)
    ap.add_argument("--batch-clips", type=int, default=4)
    ap.add_argument("--batches", type=int, default=200, help="timed batches (at 60, runs varied by 10%%)")
    ap.add_argument("--cores", type=int, default=4, help="CPU cores our pipeline may use (affinity)")
    ap.add_argument("--reader-workers", type=int, default=DataConfig.num_workers)
    ap.add_argument("--decoder-threads", type=int, default=DataConfig.decoder_threads)
    ap.add_argument("--hw-decoder-load", type=float, default=DataConfig.hw_decoder_load)
    ap.add_argument("--prefetch", type=int, default=DataConfig.prefetch)
    ap.add_argument("--baseline-workers", type=int, default=4)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--variants", nargs="*", default=[], help="more settings of ours to measure (see above)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [parse_variant(text, args) for text in args.variants]  # errors before any work
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fff_vdi_data_bench_"))
    src, shards = make_dataset(root, args)

    results = {"card": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "clip": {"frames": args.frames_per_clip, "height": 256, "width": 512, "source": "1280x720 JPEG"},
               "batch_clips": args.batch_clips}
    backend = "dali" if device.type == "cuda" else "cpu"
    results["ours"] = run_ours(shards, args, device, backend)
    print(json.dumps(results["ours"], indent=1), flush=True)
    if variants:
        results["variants"] = []
    for variant in variants:
        results["variants"].append({"variant": variant.name,
                                    **run_ours(shards, variant, device, backend, variant.stage)})
        print(json.dumps(results["variants"][-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if not args.skip_baseline:
        results["baseline"] = {"workers": args.baseline_workers, **baseline(src, args, device)}
        print(json.dumps(results["baseline"], indent=1), flush=True)
        if "frames_per_s" in results["ours"]:
            results["speedup"] = results["ours"]["frames_per_s"] / results["baseline"]["frames_per_s"]
            results["speedup_per_core"] = (results["ours"]["frames_per_s_per_core"]
                                           / results["baseline"]["frames_per_s_per_core"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| pipeline | frames/s | cores busy | frames/s per core | host RSS GiB |\n|---|---|---|---|---|")
    rows = [("ours", results.get("ours", {})), ("baseline", results.get("baseline", {}))]
    rows += [(r["variant"], r) for r in results.get("variants", [])]
    for name, r in rows:
        if "frames_per_s" in r:
            rss = "-" if r["host_rss_gib"] is None else f"{r['host_rss_gib']:.1f}"
            print(f"| {name} | {r['frames_per_s']:.0f} | {r['cpu_cores_busy']:.2f} | {r['frames_per_s_per_core']:.0f} "
                  f"| {rss} |")
        elif "error" in r:
            print(f"| {name} | error: {r['error'][:80]} | | | |")
    if "speedup_per_core" in results:
        print(f"speedup {results['speedup']:.1f}x, per core {results['speedup_per_core']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
