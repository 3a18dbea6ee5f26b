"""The manifest of a finished folder: every shard with its hashes, and the totals; and how a shard on
disk compares with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fff_vdi
from fff_vdi.data.shards import FORMAT_VERSION, MANIFEST_FORMAT, MANIFEST_NAME, index_name
from fff_vdi.sharder.options import TOOL, ShardOptions
from fff_vdi.sharder.records import REPAIRED_FRAME, SKIPPED_FRAME, SKIPPED_VIDEO, count


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(options: ShardOptions, indexes: dict[str, list[dict]], records: list[dict]) -> dict:
    splits = {}
    for split, split_indexes in indexes.items():
        shards = [{"name": index["shard"], "index": index_name(index["shard"]), "sha256": index["sha256"],
                   "bytes": index["bytes"], "index_sha256": sha256_file(options.out / index_name(index["shard"])),
                   "videos": len(index["samples"]), "frames": sum(s["num_frames"] for s in index["samples"])}
                  for index in split_indexes]
        splits[split] = {"shards": shards, "videos": sum(s["videos"] for s in shards),
                         "frames": sum(s["frames"] for s in shards)}
    all_shards = [shard for split in splits.values() for shard in split["shards"]]
    return {
        "format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "tool": TOOL, "tool_version": fff_vdi.__version__,
        "args": options.output_args(), "with_annotations": options.with_annotations, "splits": splits,
        "totals": {"videos": sum(s["videos"] for s in splits.values()),
                   "frames": sum(s["frames"] for s in splits.values()),
                   "bytes": sum(s["bytes"] for s in all_shards), "skipped_videos": count(records, SKIPPED_VIDEO),
                   "skipped_frames": count(records, SKIPPED_FRAME),
                   "repaired_frames": count(records, REPAIRED_FRAME)},
    }


def compare_with_manifest(root: Path, shard: dict) -> tuple[list[str], bool]:
    """How a shard's tar and index differ from the manifest's sizes and sha256 (nothing: they are the
    bytes that were written and verified), and whether both could be read."""
    problems = []
    for path, digest, size in ((root / shard["name"], shard["sha256"], shard["bytes"]),
                               (root / shard["index"], shard["index_sha256"], None)):
        if not path.is_file():
            return problems + [f"{path}: missing (listed in {MANIFEST_NAME})"], False
        if size is not None and path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, {MANIFEST_NAME} says {size}")
        try:
            if sha256_file(path) != digest:
                problems.append(f"{path}: sha256 differs from {MANIFEST_NAME}'s")
        except OSError as e:
            return problems + [f"{path}: cannot be read ({e.strerror})"], False
    return problems, True
