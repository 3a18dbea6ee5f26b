#!/usr/bin/env python
"""Pack YouTube-VOS (or any folder of <video>/<frame>.jpg) into WebDataset shards with a byte-offset index.

    python tools/shard_ytvos.py --src ROOT --out DIR [--workers N] [--shard-size 1GB] [--min-frames N]
                                [--max-side PX] [--val-fraction F] [--with-annotations] [--resume]
    python tools/shard_ytvos.py --verify DIR
    python tools/shard_ytvos.py --repair DIR [--src ROOT] [--workers N]

Exit status: 0 when the run finished (skips are listed, not fatal), --verify found no problem or
--repair rewrote every damaged shard (or found none);
1 when --verify found problems, an output file is unreadable or cannot be written (a full disk), or a
worker process died (then --resume continues); 2 for a bad argument, an unusable source, or an output
folder that may not be used (not empty, not ours, or where no file can be made), or a source that
no longer gives the bytes --repair must rewrite.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import fff_vdi.sharder  # noqa: E402
from fff_vdi.data.shards import MANIFEST_NAME, not_a_shard_folder  # noqa: E402
from fff_vdi.errors import DataError, InputError  # noqa: E402
from fff_vdi.sharder.options import ShardOptions, default_workers, parse_size, usable_cores  # noqa: E402
from fff_vdi.sharder.repair import repair_shards  # noqa: E402
from fff_vdi.sharder.run import run_sharding  # noqa: E402
from fff_vdi.sharder.verify import verify_shards  # noqa: E402
from fff_vdi.utils.paths import os_error_text  # noqa: E402

SHAPING_FLAGS = ("shard_size", "min_frames", "max_side", "val_fraction", "with_annotations", "resume")
POLICY = fff_vdi.sharder.__doc__.split("\n\n", 1)[1].partition("\n\nModules,")[0]  # the module map stays out of --help


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/shard_ytvos.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + POLICY,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="dataset root holding JPEGImages/ (and Annotations/ or Masks/), "
                                                 "or the JPEGImages/ folder itself")
    parser.add_argument("--out", type=Path, help="output folder (empty or new; or an earlier run's with --resume)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that read and decode videos (default: one fewer than the usable cores from 8 "
                             f"cores up, else every core: {default_workers()} here; --verify: every core); "
                             "the output does not depend on it")
    parser.add_argument("--shard-size", type=_size, default=parse_size("1GB"), metavar="SIZE",
                        help="fill each tar up to this size: 1GB (10^9 bytes), 500MB, 64MiB (2^20) or bytes; a video "
                             "larger than SIZE gets a shard of its own (default 1GB)")
    parser.add_argument("--min-frames", type=int, default=1, metavar="N",
                        help="skip videos with fewer usable frames (default 1)")
    parser.add_argument("--max-side", type=int, default=None, metavar="PX",
                        help="downscale videos whose longer side exceeds PX (re-encoded at quality 95)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="put this fraction of videos (chosen by sha1 of the video id) in val-* shards")
    parser.add_argument("--with-annotations", action="store_true",
                        help="add object masks from Annotations/ or Masks/ as <key>.mNNNNN.png")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted run in --out (same arguments); a finished one is left as is")
    parser.add_argument("--verify", type=Path, metavar="DIR",
                        help="re-hash and decode every shard, frame and mask of DIR; exit 1 on any mismatch")
    parser.add_argument("--repair", type=Path, metavar="DIR",
                        help="rewrite the shards of DIR that are missing or differ from its manifest, from the source "
                             "and with the arguments the manifest records (--src where the source has moved), "
                             "byte-identical to the first run; refused, changing nothing, if the source changed")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            if args.src is not None or args.out is not None or args.repair is not None:
                parser.error("--verify DIR checks a finished folder; give it without --src, --out and --repair")
            return verify(args.verify, usable_cores() if args.workers is None else args.workers)
        if args.repair is not None:
            shaping = [flag for flag in SHAPING_FLAGS if getattr(args, flag) != parser.get_default(flag)]
            if args.out is not None or shaping:
                parser.error(f"--repair DIR takes {', '.join(['--out'] * (args.out is not None) + shaping)} from "
                             "DIR's manifest; give only --src (where the source has moved) and --workers")
            return repair(args.repair, args.src, default_workers() if args.workers is None else args.workers)
        if args.src is None or args.out is None:
            parser.error("--src and --out are required (or --verify DIR, or --repair DIR): --src is the dataset root "
                         "holding JPEGImages/ or the JPEGImages/ folder, --out an empty or new folder")
        run_sharding(ShardOptions(
            src=args.src, out=args.out, workers=default_workers() if args.workers is None else args.workers,
            shard_size=args.shard_size,
            min_frames=args.min_frames, max_side=args.max_side, val_fraction=args.val_fraction,
            with_annotations=args.with_annotations, resume=args.resume))
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # what the checks up front cannot foresee: a full disk, a failing drive
        if args.verify is not None:
            print(f"error: {os_error_text(e, args.verify)}; check that the folder and its files can be read",
                  file=sys.stderr)
        elif args.repair is not None:
            print(f"error: {os_error_text(e, args.repair)}; fix that (free space, permissions), then run --repair "
                  "again: a shard is only replaced by its verified copy", file=sys.stderr)
        else:
            print(f"error: {os_error_text(e, args.out)}; fix that (free space, permissions), then rerun with "
                  "--resume: finished shards are kept", file=sys.stderr)
        return 1


def require_shard_folder(folder: Path) -> None:
    """A --verify or --repair folder that holds no finished shards is a wrong argument (exit 2), not damage."""
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(not_a_shard_folder(folder))


def verify(folder: Path, workers: int) -> int:
    check = verify_shards(folder, workers)
    for problem in check.problems:
        print(problem)
    if check.problems:
        print(f"verify: {len(check.problems)} problems in {folder}; tools/shard_ytvos.py --repair {folder} rewrites "
              "the shards that differ from its manifest, from the source", file=sys.stderr)
        return 1
    print(f"verify: OK: {folder}: {check.videos} videos, {check.frames} frames, {check.masks} masks, "
          f"{check.bytes / 1e9:.3f} GB")
    return 0


def repair(folder: Path, src: Path | None, workers: int) -> int:
    require_shard_folder(folder)
    replaced = repair_shards(folder, src, workers)
    if replaced:
        print(f"repair: replaced {', '.join(replaced)} in {folder}, byte-identical to the manifest's; no other file "
              "was touched")
    else:
        print(f"repair: every shard of {folder} matches its manifest; nothing to repair (--verify also decodes them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
