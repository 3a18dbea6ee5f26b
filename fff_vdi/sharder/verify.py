"""Check a finished folder against its manifest: re-hash every shard and index, compare the tar's
own headers with the index, and decode every frame and mask at its indexed offset."""

from __future__ import annotations

import itertools
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from fff_vdi.data.shards import MANIFEST_NAME, SHARD_FILE, DamagedMember, frame_member_name, load_index, \
    load_manifest, mask_member_name, meta_member_name, not_a_shard_folder, read_member
from fff_vdi.errors import DataError, InputError
from fff_vdi.sharder.frames import BadFile, decode_jpeg, decode_png
from fff_vdi.sharder.manifest import compare_with_manifest
from fff_vdi.utils.parallel import map_in_order


@dataclass
class ShardCheck:
    problems: list[str]
    videos: int = 0
    frames: int = 0
    masks: int = 0
    bytes: int = 0


def verify_shards(out: Path, workers: int = 1) -> ShardCheck:
    """Re-hash every shard and index against the manifest, check the tar structure against the
    index, and decode every frame and mask at its indexed offset (crc32 first)."""
    if workers < 1:
        raise InputError(f"--workers={workers}: use 1 or more")
    if not (out / MANIFEST_NAME).is_file():  # a wrong argument (exit 2), not damage found
        raise InputError(not_a_shard_folder(out))
    manifest = load_manifest(out)
    jobs = [(str(out), shard, manifest["with_annotations"])
            for split in manifest["splits"].values() for shard in split["shards"]]
    total = ShardCheck([])
    for check in tqdm(map_in_order(verify_shard, jobs, workers), total=len(jobs), unit="shard", dynamic_ncols=True):
        total.problems += check.problems
        total.videos, total.frames = total.videos + check.videos, total.frames + check.frames
        total.masks, total.bytes = total.masks + check.masks, total.bytes + check.bytes
    expected = manifest["totals"]
    if not total.problems and (total.videos, total.frames, total.bytes) != (
            expected["videos"], expected["frames"], expected["bytes"]):
        total.problems.append(f"{out / MANIFEST_NAME}: totals say {expected['videos']} videos, {expected['frames']} "
                              f"frames, {expected['bytes']} bytes; the shards hold {total.videos}, {total.frames}, "
                              f"{total.bytes}")
    listed = {name for _, shard, _ in jobs for name in (shard["name"], shard["index"])}
    total.problems += [f"{path}: shard file not listed in {MANIFEST_NAME} (left from another run?)"
                       for path in sorted(out.iterdir())
                       if SHARD_FILE.fullmatch(path.name) and path.name not in listed]
    return total


def verify_shard(job: tuple[str, dict, bool]) -> ShardCheck:
    root, shard, with_annotations = job
    root = Path(root)
    tar_path = root / shard["name"]
    check = ShardCheck([])

    def problem(reason: str, member: str | None = None, path: Path = tar_path) -> None:
        check.problems.append(f"{path}: " + (f"member {member}: " if member else "") + reason)

    check.problems, readable = compare_with_manifest(root, shard)
    if not readable:
        return check
    try:
        index = load_index(root, shard)
    except DataError as e:
        check.problems.append(str(e))
        return check
    check.bytes = shard["bytes"]
    expected = [(name, member) for sample in index["samples"] for name, member in _indexed_members(sample)]
    _check_tar_structure(tar_path, sorted(expected, key=lambda nm: nm[1][0]), problem)
    with open(tar_path, "rb") as file:
        for sample in index["samples"]:
            _check_sample(file.fileno(), sample, with_annotations, check, problem)
    return check


def _indexed_members(sample: dict) -> list[tuple[str, list[int]]]:
    key = sample["key"]
    members = [(frame_member_name(key, i), m) for i, m in enumerate(sample["frames"])]
    members.append((meta_member_name(key), sample["json"]))
    members += [(mask_member_name(key, i), m) for i, m in enumerate(sample["masks"] or []) if m is not None]
    return members


def _check_tar_structure(tar_path: Path, expected: list, problem: Callable) -> None:
    """The tar's own headers must list exactly the indexed members, at the indexed offsets."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            actual = [(m.name, [m.offset_data, m.size]) for m in tar]
    except (tarfile.TarError, OSError) as e:
        problem(f"cannot be read as a tar ({e})")
        return
    for (name, member), found in itertools.zip_longest(expected, actual, fillvalue=(None, None)):
        if found == (None, None):
            problem(f"indexed at offset {member[0]} but the tar ends before it", name)
            return
        if name is None or (name, member[:2]) != found:
            index_says = f"says {name} at offset {member[0]} ({member[1]} bytes)" if name else "lists no more members"
            problem(f"tar header says {found[0]} at offset {found[1][0]} ({found[1][1]} bytes), the index {index_says}",
                    name or found[0])
            return  # later members are shifted too; one report is enough


def _check_sample(fd: int, sample: dict, with_annotations: bool, check: ShardCheck, problem: Callable) -> None:
    key, size = sample["key"], (sample["width"], sample["height"])

    def read(name: str, member: list[int]) -> bytes | None:
        try:
            return read_member(fd, member)
        except DamagedMember as e:
            problem(e.detail, name)
            return None

    check.videos += 1
    meta_data = read(meta_member_name(key), sample["json"])
    try:
        meta = None if meta_data is None else json.loads(meta_data)
    except ValueError as e:
        problem(f"not JSON ({e})", meta_member_name(key))
        meta = None
    if meta is not None and (meta["key"], meta["video_id"], meta["num_frames"], len(meta["frame_names"]),
                             meta["width"], meta["height"]) != (key, sample["video_id"], *[sample["num_frames"]] * 2,
                                                                *size):
        problem("key, video_id, num_frames, frame_names or size differ from the index", meta_member_name(key))
    if len(sample["frames"]) != sample["num_frames"]:
        problem(f"index lists {len(sample['frames'])} frames, num_frames is {sample['num_frames']}",
                frame_member_name(key, 0))
    for i, member in enumerate(sample["frames"]):
        name = frame_member_name(key, i)
        data = read(name, member)
        check.frames += 1
        if data is None:
            continue
        try:
            image, repair = decode_jpeg(data)
        except BadFile as e:
            problem(str(e), name)
            continue
        if repair or image.size != size:
            problem(f"{repair or 'a JPEG'} of {image.size[0]}x{image.size[1]}; expected a baseline RGB JPEG of "
                    f"{size[0]}x{size[1]}", name)
    masks = sample["masks"]
    if (masks is not None) != with_annotations or (masks is not None and len(masks) != sample["num_frames"]):
        problem(f"index masks do not match with_annotations={with_annotations} and {sample['num_frames']} frames",
                meta_member_name(key))
        return
    for i, member in enumerate(masks or []):
        name = mask_member_name(key, i)
        data = None if member is None else read(name, member)
        if data is None:
            continue
        check.masks += 1
        try:
            image = decode_png(data)
        except BadFile as e:
            problem(str(e), name)
            continue
        if image.size != size:
            problem(f"mask is {image.size[0]}x{image.size[1]}, its frames are {size[0]}x{size[1]}", name)
    if meta is not None and meta["mask_frames"] != [i for i, m in enumerate(masks or []) if m is not None]:
        problem("mask_frames differs from the masks in the index", meta_member_name(key))
