"""What an output folder holds (fresh, an interrupted run, a finished one), and where --resume
continues: the finished shards are kept, the rest removed and made again."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from fff_vdi.data.shards import MANIFEST_NAME, REPORT_NAME, SHARD_FILE, index_name, load_manifest, shard_name
from fff_vdi.errors import DataError, InputError
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.records import DECODE
from fff_vdi.sharder.scan import Scan, VideoTask
from fff_vdi.utils.atomic import is_temp_name
from fff_vdi.utils.paths import unwritable_reason

FRESH, RESUMING, FINISHED = "fresh", "resuming", "finished"


def output_state(options: ShardOptions) -> str:
    """FRESH, RESUMING or FINISHED; raises InputError when the folder may not be used as asked."""
    out = options.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pick a folder")
    problem = unwritable_reason(out)
    if problem:
        raise InputError(f"--out {out}: {problem}; pick a folder you can write")
    names = sorted(p.name for p in out.iterdir() if not is_temp_name(p)) if out.is_dir() else []
    if not names:
        return FRESH
    foreign = [n for n in names if n not in (MANIFEST_NAME, REPORT_NAME) and not SHARD_FILE.fullmatch(n)]
    if foreign:
        raise InputError(f"--out {out} holds files this tool did not write ({', '.join(foreign[:5])}); "
                         "pick an empty folder")
    finished = MANIFEST_NAME in names
    if not options.resume:
        raise InputError(f"--out {out} already holds " + (
            "a finished shard set; pass --resume to check it is complete, or pick an empty folder" if finished else
            "shards of an unfinished run; pass --resume to finish it, or pick an empty folder"))
    if finished:
        recorded = load_manifest(out)["args"]
    elif REPORT_NAME in names:
        recorded = load_json(out / REPORT_NAME)["args"]
    else:
        raise InputError(f"--out {out} holds shards but no {REPORT_NAME}, so it cannot be resumed; "
                         "pick an empty folder")
    wanted = options.output_args()
    changed = [f"{k}: {recorded.get(k)!r} then, {v!r} now" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise InputError(f"--resume: {out} was made with other arguments ({'; '.join(changed)}); "
                         "rerun with the same arguments, or pick an empty folder")
    return FINISHED if finished else RESUMING


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON ({e}); remove the folder and start again") from e


def finished_shards(out: Path, split: str) -> list[dict]:
    """Indexes of the split's shards whose tar and index were both renamed into place, in order.
    Files of the first unfinished shard and of any after it are removed (they will be rewritten)."""
    indexes = []
    for number in itertools.count():
        name = shard_name(split, number)
        tar, index = out / name, out / index_name(name)
        if not (tar.is_file() and index.is_file()):
            break
        loaded = load_json(index)
        if loaded.get("shard") != name or loaded.get("bytes") != tar.stat().st_size:
            break
        indexes.append(loaded)
    for path in sorted(out.iterdir()):
        match = SHARD_FILE.fullmatch(path.name)
        if match and match["split"] == split and int(match["number"]) >= len(indexes):
            print(f"resume: removing {path.name} (unfinished; it will be rewritten)")
            path.unlink()
    return indexes


def resume_point(out: Path, tasks: list[VideoTask], indexes: list[dict]) -> int:
    """Position in `tasks` of the first video after the finished shards' last video."""
    position = {task.video_id: i for i, task in enumerate(tasks)}
    last = -1
    for index in indexes:
        for sample in index["samples"]:
            here = position.get(sample["video_id"], -1)
            if here <= last:
                raise InputError(f"--resume: {out / index['shard']} holds video '{sample['video_id']}', which the "
                                 "source no longer gives at that place; the source changed since the first run: "
                                 "pick an empty folder")
            last = here
    return last + 1


def resume_plan(options: ShardOptions, scan: Scan) -> tuple[dict, dict, list[dict]]:
    """Per split, the finished shards' indexes and the position to continue from; and the journal's
    records of the videos before those positions."""
    indexes = {split: finished_shards(options.out, split) for split in options.splits}
    start = {split: resume_point(options.out, scan.tasks[split], indexes[split]) for split in options.splits}
    records = records_before(load_json(options.out / REPORT_NAME)["records"], scan.tasks, start)
    print(f"resume: {sum(map(len, indexes.values()))} shards finished; continuing after {sum(start.values())} of "
          f"{sum(map(len, scan.tasks.values()))} videos")
    return indexes, start, records


def records_before(records: list[dict], tasks: dict[str, list[VideoTask]], start: dict[str, int]) -> list[dict]:
    """The journal's records of videos before the resume point (later ones are made again)."""
    position = {(task.split, task.video_id): i for split_tasks in tasks.values() for i, task in enumerate(split_tasks)}
    return [r for r in records if r["stage"] == DECODE
            and position.get((r["split"], r["video_id"]), len(position)) < start[r["split"]]]
