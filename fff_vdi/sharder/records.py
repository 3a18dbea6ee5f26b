"""What a run records about its input (report.json): the records, the journal of a run in progress,
and the printed summary."""

from __future__ import annotations

from pathlib import Path

import fff_vdi
from fff_vdi.data.shards import FORMAT_VERSION, REPORT_FORMAT, REPORT_NAME
from fff_vdi.sharder.options import TOOL
from fff_vdi.utils.atomic import atomic_write_json

# Kinds of report records: a "mask" record means frames without a usable mask, a "note" changes nothing.
SKIPPED_VIDEO, SKIPPED_FRAME, REPAIRED_FRAME, DOWNSCALED_VIDEO, MASK, NOTE = (
    "skipped_video", "skipped_frame", "repaired_frame", "downscaled_video", "mask", "note")
SCAN, DECODE = "scan", "decode"  # stage that made a record: listing folders, or reading the files


def record(kind: str, stage: str, path: str, reason: str, **fields) -> dict:
    return {"kind": kind, "stage": stage, "path": path, "reason": reason, **fields}


def count(records: list[dict], kind: str) -> int:
    return sum(r["kind"] == kind for r in records)


class Journal:
    """report.json while a run is in progress: the arguments and the records of the videos read so
    far. It is saved before each tar is renamed, so on --resume it covers every finished shard."""

    def __init__(self, out: Path, args: dict, source: dict, records: list[dict]):
        self.path = out / REPORT_NAME
        self.args, self.source, self.records = args, source, records

    def save(self, status: str = "in progress", totals: dict | None = None) -> dict:
        report = {"format": REPORT_FORMAT, "version": FORMAT_VERSION, "status": status, "tool": TOOL,
                  "tool_version": fff_vdi.__version__, "args": self.args, "source": self.source,
                  "records": self.records}
        if totals is not None:
            report["totals"] = totals
        atomic_write_json(self.path, report)
        return report


_LABELS = {SKIPPED_VIDEO: "skipped videos", SKIPPED_FRAME: "skipped frames", REPAIRED_FRAME: "repaired frames",
           DOWNSCALED_VIDEO: "downscaled videos", MASK: "mask notes (frames without a usable mask)", NOTE: "notes"}


def print_records(records: list[dict], kinds: list[str], limit: int | None = None) -> None:
    for kind in kinds:
        chosen = [r for r in records if r["kind"] == kind]
        if chosen:
            print(f"{_LABELS[kind]}: {len(chosen)}")
            for r in chosen[:limit]:
                print(f"  {r['path']}: {r['reason']}")
            if limit is not None and len(chosen) > limit:
                print(f"  ... and {len(chosen) - limit} more in {REPORT_NAME}")


def print_summary(report: dict, manifest: dict, out: Path) -> None:
    """Totals, every skip with its reason, and the first few repairs and notes."""
    totals = manifest["totals"]
    splits = ", ".join(f"{split}: {s['videos']} videos in {len(s['shards'])} shards"
                       for split, s in manifest["splits"].items())
    print(f"shard_ytvos: {out}: {totals['videos']} videos, {totals['frames']} frames, "
          f"{totals['bytes'] / 1e9:.3f} GB ({splits})")
    print_records(report["records"], [SKIPPED_VIDEO, SKIPPED_FRAME])
    print_records(report["records"], [REPAIRED_FRAME, DOWNSCALED_VIDEO, MASK, NOTE], limit=5)
    print(f"report: {out / REPORT_NAME}")
