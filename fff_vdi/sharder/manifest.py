"""The manifest of a finished folder: every shard with its hashes, and the totals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fff_vdi
from fff_vdi.data.shards import FORMAT_VERSION, MANIFEST_FORMAT, index_name
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
