"""One sharding run: scan, read and pack the videos in worker processes, write the shards in order,
then the report and, last, the manifest."""

from __future__ import annotations

import functools
import itertools
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from fff_vdi.data.shards import MANIFEST_NAME
from fff_vdi.errors import DataError, InputError
from fff_vdi.sharder.manifest import build_manifest
from fff_vdi.sharder.options import SPLITS, ShardOptions
from fff_vdi.sharder.records import DOWNSCALED_VIDEO, MASK, NOTE, SKIPPED_VIDEO, Journal, count, print_records, \
    print_summary
from fff_vdi.sharder.resume import FINISHED, FRESH, RESUMING, output_state, resume_plan
from fff_vdi.sharder.scan import EXPECTED_LAYOUT, VideoTask, resolve_source, scan_source
from fff_vdi.sharder.spool import Spool
from fff_vdi.sharder.videos import process_video
from fff_vdi.sharder.writer import Progress, ShardWriter, crash_point
from fff_vdi.utils.atomic import atomic_write_json, remove_temp_files
from fff_vdi.utils.parallel import map_in_order


@dataclass
class RunSummary:
    out: Path
    state: str  # FRESH, RESUMING or FINISHED (nothing was done)
    report: dict | None = None
    manifest: dict | None = None


def run_sharding(options: ShardOptions) -> RunSummary:
    """Shard `options.src` into `options.out` (see `fff_vdi.sharder`); raises InputError when
    nothing usable is found or the output folder may not be used."""
    options.validate()
    layout = resolve_source(options.src, options.with_annotations)
    state = output_state(options)
    if state == FINISHED:
        print(f"{options.out} is already finished with these arguments; nothing to do (--verify {options.out} "
              f"checks it, --repair {options.out} rewrites the shards that --verify lists)")
        return RunSummary(options.out, state)
    if state == FRESH and options.resume:
        print(f"resume: {options.out} holds no earlier run; starting a new one")
    scan = scan_source(layout, options)
    if not any(scan.tasks.values()):
        print_records(scan.records, [SKIPPED_VIDEO])
        raise InputError(f"--src {options.src}: no usable video among the {scan.num_videos} video folders of "
                         f"{layout.frames} (skips listed above); {EXPECTED_LAYOUT}")
    options.out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(options.out)
    source = {"root": str(layout.root.resolve()), "frames": layout.rel(layout.frames),
              "annotations": None if layout.annotations is None else layout.rel(layout.annotations)}
    journal = Journal(options.out, options.output_args(), source, [])
    indexes = {split: [] for split in options.splits}
    start = {split: 0 for split in options.splits}
    if state == RESUMING:
        indexes, start, journal.records = resume_plan(options, scan)
    journal.save()

    tasks = [task for split in options.splits for task in scan.tasks[split][start[split]:]]
    progress = Progress(len(tasks))
    writer = ShardWriter(options.out, options.shard_size, journal, progress)
    spool = Spool.for_workers(options.workers)
    spool.remove_files()  # left by a run that was killed
    try:
        results = map_in_order(functools.partial(process_video, spool=spool), tasks, options.workers)
        for split, split_results in itertools.groupby(results, key=lambda r: r.split):
            indexes[split] += writer.write_split(split, split_results, len(indexes[split]))
    except BrokenProcessPool as e:
        raise DataError(f"a worker process died ({e}): out of memory, or a crash in the image decoder; finished "
                        f"shards are kept: rerun with --resume (with fewer --workers if memory is short)") from e
    finally:
        progress.close()
        spool.remove_files()  # after an error: payloads that were made but not written

    journal.records = scan.records + _in_plan_order(journal.records, scan.tasks)
    manifest = build_manifest(options, indexes, journal.records)
    counts = {"downscaled_videos": DOWNSCALED_VIDEO, "mask_notes": MASK, "notes": NOTE}
    report = journal.save("finished", {**manifest["totals"],
                                       **{name: count(journal.records, kind) for name, kind in counts.items()}})
    crash_point("report-finished")
    print_summary(report, manifest, options.out)
    if manifest["totals"]["videos"] == 0:
        raise InputError(f"--src {options.src}: no usable video; all {scan.num_videos} were skipped (see "
                         f"{journal.path}); {EXPECTED_LAYOUT}")
    atomic_write_json(options.out / MANIFEST_NAME, manifest)
    return RunSummary(options.out, state, report, manifest)


def _in_plan_order(records: list[dict], tasks: dict[str, list[VideoTask]]) -> list[dict]:
    """Decode records sorted by split and video position (stable: a video's own order is kept), so a
    resumed run lists them exactly as an uninterrupted one."""
    position = {(task.split, task.video_id): (SPLITS.index(split), i)
                for split, split_tasks in tasks.items() for i, task in enumerate(split_tasks)}
    return sorted(records, key=lambda r: position[(r["split"], r["video_id"])])
