"""`--verify`: re-hash every unit of a finished cache and check every record against its index.

Checks, each problem one line naming the file (and record): the units' tars and indexes against the
manifest's sha256 and sizes; the tar's own headers against the index (names, offsets, sizes); every
record's size (from the cache's resolution and dtypes) and crc32; that every video has a record per
frame and a flow per frame and step; the totals; unit files the manifest does not list; and that the
image shards the cache was made from are still those in their folder (by sha256, as in the manifests).
"""

from __future__ import annotations

import itertools
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from fff_vdi.conditioning.format import (
    MANIFEST_NAME,
    RecordShapes,
    describe_shard_change,
    embed_member,
    flows_member,
    image_shard_identity,
    load_manifest,
    load_unit_index,
    moments_member,
)
from fff_vdi.conditioning.writer import UNIT_FILE
from fff_vdi.data.shards import DamagedMember, read_member
from fff_vdi.data.shards import load_manifest as load_image_manifest
from fff_vdi.sharder.manifest import sha256_file
from fff_vdi.errors import DataError


@dataclass
class CacheCheck:
    problems: list[str] = field(default_factory=list)
    units: int = 0
    videos: int = 0
    frames: int = 0
    records: int = 0
    bytes: int = 0


def verify_cache(root: Path, image_shards: Path | None = None) -> CacheCheck:
    """Check `root` (see the module docstring); `image_shards` defaults to the folder the manifest names."""
    manifest = load_manifest(root)
    shapes = RecordShapes.of(manifest["args"])
    check = CacheCheck()
    for unit in manifest["units"]:
        _verify_unit(root, unit, shapes, check)
    totals = manifest["totals"]
    if not check.problems and (check.units, check.videos, check.frames, check.bytes) != (
            totals["units"], totals["videos"], totals["frames"], totals["bytes"]):
        check.problems.append(f"{root / MANIFEST_NAME}: totals say {totals}, the units hold {check.units} units, "
                              f"{check.videos} videos, {check.frames} frames, {check.bytes} bytes")
    listed = {name for unit in manifest["units"] for name in (unit["name"], unit["index"])}
    check.problems += [f"{p}: unit file not listed in {MANIFEST_NAME} (left from another run?)"
                       for p in sorted(root.iterdir()) if UNIT_FILE.fullmatch(p.name) and p.name not in listed]
    check.problems += _image_shard_problems(manifest, Path(image_shards or manifest["image_shards_root"]))
    return check


def _verify_unit(root: Path, unit: dict, shapes: RecordShapes, check: CacheCheck) -> None:
    tar_path, index_path = root / unit["name"], root / unit["index"]
    for path, digest in ((tar_path, unit["sha256"]), (index_path, unit["index_sha256"])):
        if not path.is_file():
            check.problems.append(f"{path}: missing (listed in {MANIFEST_NAME})")
            return
        if sha256_file(path) != digest:
            check.problems.append(f"{path}: sha256 differs from {MANIFEST_NAME}'s")
    try:
        index = load_unit_index(root, unit)
    except DataError as e:
        check.problems.append(str(e))
        return
    check.units += 1
    check.bytes += unit["bytes"]
    expected = []  # (name, offset, size, crc, expected size) in tar order
    for video in index["videos"]:
        key, n = video["key"], video["num_frames"]
        check.videos += 1
        check.frames += n
        kinds = [("moments", moments_member, video["moments"], n, None), ("embeds", embed_member, video["embeds"], n, None)]
        kinds += [("flows", flows_member, rows, n - int(s), int(s)) for s, rows in video["flows"].items()]
        for kind, name_of, rows, count, step in kinds:
            if len(rows) != count:
                check.problems.append(f"{index_path}: video {key} has {len(rows)} {kind} records, expected {count}")
            for i, (offset, size, crc) in enumerate(rows):
                name = name_of(key, i) if step is None else name_of(key, step, i)
                expected.append((name, offset, size, crc, shapes.nbytes(kind)))
    _check_tar_headers(tar_path, expected, check)
    with open(tar_path, "rb") as f:
        for name, offset, size, crc, nbytes in expected:
            check.records += 1
            if size != nbytes:
                check.problems.append(f"{tar_path}: record {name}: {size} bytes, its kind takes {nbytes}")
                continue
            try:
                read_member(f.fileno(), (offset, size, crc))
            except DamagedMember as e:
                check.problems.append(f"{tar_path}: record {name}: {e.detail}")


def _check_tar_headers(tar_path: Path, expected: list, check: CacheCheck) -> None:
    try:
        with tarfile.open(tar_path, "r:") as tar:
            actual = [(m.name, m.offset_data, m.size) for m in tar]
    except (tarfile.TarError, OSError) as e:
        check.problems.append(f"{tar_path}: cannot be read as a tar ({e})")
        return
    indexed = [(name, offset, size) for offset, name, size in sorted((o, n, s) for n, o, s, _, _ in expected)]
    for found, wanted in itertools.zip_longest(actual, indexed):
        if found != wanted:  # later members are shifted too: one report is enough
            check.problems.append(f"{tar_path}: the tar's headers disagree with the index: the tar has {found} "
                                  f"(name, offset, size) where the index has {wanted}")
            return


def _image_shard_problems(manifest: dict, image_root: Path) -> list[str]:
    recorded = manifest["args"]["image_shards"]
    try:
        current = image_shard_identity(load_image_manifest(image_root), recorded["split"])
    except (DataError, KeyError) as e:
        return [f"{image_root}: the image shards this cache was made from cannot be read ({e}); pass --image-shards DIR"]
    if current != recorded["shards"]:
        return [f"{image_root}: the image shards changed since the cache was made "
                f"({describe_shard_change(recorded['shards'], current)}); rebuild the cache"]
    return []
