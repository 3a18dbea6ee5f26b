"""Rewrite the damaged shards of a finished folder from the source, byte-identical to the first run.

A shard is damaged when its tar or its index is missing, or differs from the manifest in size or
sha256. Shards are filled greedily in the plan's order, so a run of damaged shards k..m of a split
held exactly the videos between the last video of shard k-1 and the first of shard m+1 (intact, so
their indexes name those videos; or the split's ends). Those videos are read and packed again as the
first run did, into a scratch folder inside the shard folder. Only when every remade tar and index has
the manifest's sha256 are they renamed over the damaged ones (atomic, one file at a time): a source
that changed since is refused and nothing is changed. Shards that match the manifest, report.json and
manifest.json are never touched. After a kill, running the repair again finishes it.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from fff_vdi.data.shards import index_name, load_index, load_manifest, shard_name
from fff_vdi.errors import InputError
from fff_vdi.sharder.manifest import compare_with_manifest, sha256_file
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.records import Journal
from fff_vdi.sharder.scan import VideoTask, resolve_source, scan_source
from fff_vdi.sharder.spool import Spool
from fff_vdi.sharder.videos import process_video
from fff_vdi.sharder.writer import Progress, ShardWriter, crash_point
from fff_vdi.utils.atomic import TMP_MARK, fsync_dir
from fff_vdi.utils.parallel import map_in_order
from fff_vdi.utils.paths import unwritable_reason

SCRATCH_PREFIX = f"repair{TMP_MARK}"  # a temporary name: ignored by --resume and --verify, removed by the next repair


@dataclass
class DamagedRun:
    """Consecutive damaged shards of one split: numbers first..last of its manifest list."""

    split: str
    first: int
    last: int

    @property
    def names(self) -> list[str]:
        return [shard_name(self.split, n) for n in range(self.first, self.last + 1)]


def repair_shards(out: Path, src: Path | None = None, workers: int = 1) -> list[str]:
    """Rewrite the damaged shards of `out` from `src` (default: the source the manifest records);
    returns the names of the files replaced. Raises InputError, changing nothing, when the source no
    longer gives the manifest's bytes."""
    if workers < 1:
        raise InputError(f"--workers={workers}: use 1 or more")
    manifest = load_manifest(out)
    runs = damaged_runs(out, manifest, workers)
    if not runs:
        return []
    problem = unwritable_reason(out)
    if problem:
        raise InputError(f"--repair {out}: {problem}; the shards can only be rewritten in place")
    args = manifest["args"]
    options = ShardOptions(src=Path(args["src"]) if src is None else src, out=out, workers=workers,
                           **{k: v for k, v in args.items() if k != "src"})
    print(f"repair: rewriting {', '.join(name for run in runs for name in run.names)} from {options.src}")
    scan = scan_source(resolve_source(options.src, options.with_annotations), options)
    for stale in out.glob(f"{SCRATCH_PREFIX}*"):  # left by a repair that was killed
        shutil.rmtree(stale)
    scratch = out / f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    try:
        for run in runs:
            remake(run, videos_of(run, out, manifest, scan.tasks[run.split], options.src), scratch / run.names[0],
                   options)
            check_identical(run, scratch / run.names[0], manifest, options.src)
        return replace_files(runs, scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def damaged_runs(out: Path, manifest: dict, workers: int) -> list[DamagedRun]:
    """The damaged shards (hashed in parallel), grouped in runs of consecutive numbers per split."""
    entries = [(split, number, shard) for split, s in manifest["splits"].items() for number, shard in
               enumerate(s["shards"])]
    compared = map_in_order(functools.partial(compare_with_manifest, out), [shard for _, _, shard in entries], workers)
    runs: list[DamagedRun] = []
    for (split, number, _), (problems, _) in zip(entries, compared):
        if not problems:
            continue
        if runs and runs[-1].split == split and runs[-1].last == number - 1:
            runs[-1].last = number
        else:
            runs.append(DamagedRun(split, number, number))
    return runs


def videos_of(run: DamagedRun, out: Path, manifest: dict, tasks: list[VideoTask], src: Path) -> list[VideoTask]:
    """The source's videos from the one after the last video of the intact shard before the run to the
    one before the first video of the intact shard after it (the split's ends where there is none)."""
    shards = manifest["splits"][run.split]["shards"]
    position = {task.video_id: i for i, task in enumerate(tasks)}

    def position_of(shard: dict, sample: int) -> int:
        video_id = load_index(out, shard)["samples"][sample]["video_id"]
        if video_id not in position:
            raise source_changed(run, src, f"video '{video_id}' of {shard['name']} beside them is gone")
        return position[video_id]

    start = 0 if run.first == 0 else position_of(shards[run.first - 1], -1) + 1
    end = len(tasks) if run.last == len(shards) - 1 else position_of(shards[run.last + 1], 0)
    return tasks[start:end]


def remake(run: DamagedRun, tasks: list[VideoTask], folder: Path, options: ShardOptions) -> None:
    """Read and pack `tasks` again, and write them into shards numbered from the run's first, in
    `folder`, exactly as the first run wrote them (the same writer; its journal stays in `folder`)."""
    folder.mkdir(parents=True)
    progress = Progress(len(tasks))
    writer = ShardWriter(folder, options.shard_size, Journal(folder, options.output_args(), {}, []), progress)
    spool = Spool.for_workers(options.workers)
    spool.remove_files()
    try:
        results = map_in_order(functools.partial(process_video, spool=spool), tasks, options.workers)
        writer.write_split(run.split, results, run.first)
    finally:
        progress.close()
        spool.remove_files()


def check_identical(run: DamagedRun, folder: Path, manifest: dict, src: Path) -> None:
    """Refuse unless `folder` holds the run's shards, each tar and index with the manifest's sha256."""
    made = sorted(p.name for p in folder.glob("*.tar"))
    if made != run.names:
        raise source_changed(run, src, f"its videos now fill {', '.join(made) or 'no shard'}")
    differ = [shard["name"] for shard in manifest["splits"][run.split]["shards"][run.first:run.last + 1]
              if sha256_file(folder / shard["name"]) != shard["sha256"]
              or sha256_file(folder / shard["index"]) != shard["index_sha256"]]
    if differ:
        raise source_changed(run, src, f"{', '.join(differ)} would have another sha256 than the manifest's")


def source_changed(run: DamagedRun, src: Path, why: str) -> InputError:
    return InputError(f"--repair: the source {src} no longer gives the bytes of {', '.join(run.names)} ({why}); it "
                      "changed since the shards were written, and nothing was changed. Restore the source, or shard "
                      "it again into an empty folder")


def replace_files(runs: list[DamagedRun], scratch: Path, out: Path) -> list[str]:
    """Rename the remade files over the damaged ones, each tar before its index."""
    replaced = []
    for run in runs:
        for name in (name for tar in run.names for name in (tar, index_name(tar))):
            os.replace(scratch / run.names[0] / name, out / name)
            fsync_dir(out)
            replaced.append(name)
            crash_point("repair-replaced")
    return replaced
