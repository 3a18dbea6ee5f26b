#!/usr/bin/env python
"""Precompute the mask-independent conditioning of an experiment's image shards (RAFT flows, VAE
latent distributions, CLIP embeddings), for training with experiment.data.conditioning=DIR.

    torchrun --nproc-per-node G tools/precompute_conditioning.py --out DIR [--resume] [--flow-dtype float32]
        [--unit-frames 128] [--pairs-per-call 16] [--stats-json PATH] OVERRIDES...
    python tools/precompute_conditioning.py --verify DIR [--image-shards SHARDS]

OVERRIDES are launch/train.py's (e.g. experiment=paper_512x256 experiment.data.shards=/data/ytvos-shards):
the cache holds what that run's online conditioning computes, for its split, resolution, frame steps,
frozen networks and decode backend. On many nodes start one torchrun per node (as launch/*.sbatch do).

Exit status: 0 when the cache is finished or --verify found no problem; 1 when --verify found problems,
an input file is damaged, or the disk failed the run (full, unwritable: a killed or failed run continues
with --resume); 2 for a bad argument, configuration or output folder.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fff_vdi.errors import DataError, FFFVDIError  # noqa: E402
from fff_vdi.utils.paths import os_error_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from fff_vdi.conditioning import writer

    parser = argparse.ArgumentParser(prog="tools/precompute_conditioning.py", description=__doc__.split("\n\n")[0] + "\n\n"
                                     + writer.__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="launch/train.py's Hydra overrides (key=value)")
    parser.add_argument("--out", type=Path, help="output folder (empty or new; or an earlier run's with --resume)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (same settings)")
    parser.add_argument("--flow-dtype", choices=writer.FLOW_DTYPES, default="float32",
                        help="storage of the flows: float32 as RAFT computes them (exact; default) or float16 (half the "
                             "disk; the trainer then needs experiment.data.conditioning_approximate=[flows_float16])")
    parser.add_argument("--flow-resolution", choices=writer.FLOW_RESOLUTIONS, default="full",
                        help="full (default: exact) or eighth: the flows resized to the latent grid as the refiner "
                             "sees them, 1/64 of their disk; the trainer then needs "
                             "experiment.data.conditioning_approximate=[flows_eighth]")
    parser.add_argument("--unit-frames", type=int, default=128, metavar="N",
                        help="frames per work unit (one tar each; the unit of resume and of the split over ranks)")
    parser.add_argument("--pairs-per-call", type=int, default=16, metavar="P",
                        help="frame pairs per RAFT call (2P flows: both directions); lower it if memory is short")
    parser.add_argument("--stats-json", type=Path, metavar="PATH", help="write the run's throughput and phase times here")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="check a finished cache; exit 1 on any problem")
    parser.add_argument("--image-shards", type=Path, metavar="SHARDS",
                        help="with --verify: the image shards the cache was made from (default: the folder it names)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.out is not None or args.overrides:
            parser.error("--verify DIR checks a finished cache; give it without --out and overrides")
        try:
            return verify(args.verify, args.image_shards)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # an unreadable folder or file the checks did not name
            print(f"error: {os_error_text(e, args.verify)}; check that the folder and its files can be read",
                  file=sys.stderr)
            return 1
    if args.out is None:
        parser.error("--out DIR is required (or --verify DIR)")
    return precompute(args)


def verify(folder: Path, image_shards: Path | None) -> int:
    from fff_vdi.conditioning.verify import verify_cache

    check = verify_cache(folder, image_shards)
    for problem in check.problems:
        print(problem)
    if check.problems:
        print(f"verify: {len(check.problems)} problems in {folder}; rebuild it with tools/precompute_conditioning.py",
              file=sys.stderr)
        return 1
    print(f"verify: OK: {folder}: {check.units} units, {check.videos} videos, {check.frames} frames, "
          f"{check.records} records, {check.bytes / 1e9:.3f} GB")
    return 0


def precompute(args) -> int:
    import torch.distributed

    from fff_vdi.conditioning.writer import PrecomputeOptions, run_precompute
    from fff_vdi.config import REPO_ROOT, compose_experiment
    from fff_vdi.distributed.env import init_distributed, shutdown

    try:
        cfg = compose_experiment(REPO_ROOT / "configs", args.overrides)[0]
        options = PrecomputeOptions(args.out, args.unit_frames, args.flow_dtype, args.pairs_per_call, args.resume,
                                    args.flow_resolution)
        dist = init_distributed(timeout_s=7 * 24 * 3600)  # ranks wait for the slowest at the end
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_precompute(cfg, options, dist)
        runs = [None] * dist.world_size
        torch.distributed.all_gather_object(runs, (summary.frames, summary.seconds, summary.phases, summary.units or []))
        if dist.is_main:
            report(summary, runs, args.stats_json)
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what the checks up front cannot foresee: a full disk, a failing drive
        print(f"error: {os_error_text(e, args.out)}; fix that (free space, permissions), then rerun with --resume: "
              "finished units are kept", file=sys.stderr)
        return 1  # torchrun then stops the other ranks
    finally:
        shutdown()


def report(summary, runs: list, stats_json: Path | None) -> None:
    import torch

    frames = sum(r[0] for r in runs)
    seconds = max(r[1] for r in runs)
    if summary.manifest is not None:
        t = summary.manifest["totals"]
        print(f"precompute_conditioning: {summary.out}: {t['units']} units, {t['videos']} videos, {t['frames']} frames, "
              f"{t['bytes'] / 1e9:.3f} GB; this run computed {frames} frames in {seconds:.1f} s on {len(runs)} rank(s) "
              f"({frames / max(seconds, 1e-9):.1f} frames/s)")
    if stats_json is not None:
        later = [units[1:] for *_, units in runs]  # each rank's first unit compiles the networks
        steady = [sum(f for f, _ in u) / max(sum(s for _, s in u), 1e-9) for u in later if u]
        stats = {"frames": frames, "seconds": seconds, "ranks": len(runs),
                 "frames_per_s": frames / max(seconds, 1e-9),
                 "frames_per_s_per_rank": [r[0] / max(r[1], 1e-9) for r in runs],
                 "first_unit_seconds_per_rank": [units[0][1] if units else None for *_, units in runs],
                 "steady_frames_per_s_per_rank": steady,
                 "steady_frames_per_s": sum(steady) if steady else None,  # None: one unit per rank
                 "phase_seconds_rank0": runs[0][2],
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "totals": None if summary.manifest is None else summary.manifest["totals"],
                 "args": None if summary.manifest is None else {k: v for k, v in summary.manifest["args"].items()
                                                                if k not in ("image_shards", "networks")}}
        stats_json.parent.mkdir(parents=True, exist_ok=True)
        stats_json.write_text(json.dumps(stats, indent=1) + "\n")
        print(f"stats: {stats_json}")


if __name__ == "__main__":
    sys.exit(main())
