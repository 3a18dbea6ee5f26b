"""The shard format, and random access to frames by byte offset.

A shard folder (written by `tools/shard_ytvos.py`, see `fff_vdi.sharder`) holds:

    manifest.json                  written last: its presence means the folder is complete
    report.json                    every skipped video or frame, repair and note, with its reason
    train-000000.tar               WebDataset shards, filled up to --shard-size
    train-000000.index.json        byte offsets of every member of the tar beside it
    val-000000.tar, ...            only with --val-fraction > 0

One tar sample is one video. Its members, in this (sorted) order, with fixed tar metadata:

    <key>.f00000.jpg ... <key>.fNNNNN.jpg   frame i of the video, original JPEG bytes (baseline RGB;
                                            re-encoded only when repaired or downscaled)
    <key>.json                              {"video_id", "key", "source", "frame_names", "width",
                                             "height", "num_frames", "repaired", "downscaled",
                                             "mask_frames", "annotation_source"}
    <key>.m00000.png ...                    object mask of frame i, only for frames having one

The key is the video id with anything outside [A-Za-z0-9_-] replaced by '_'. The index is

    {"format": "fff-vdi-shard-index", "version": 1, "shard": "train-000000.tar", "bytes", "sha256",
     "samples": [{"key", "video_id", "num_frames", "width", "height", "json": [offset, size, crc32],
                  "frames": [[offset, size, crc32], ...],          # num_frames entries
                  "masks": [[offset, size, crc32] or null, ...] or null}, ...]}   # null: no annotations

with offsets of the member data inside the tar and crc32 = zlib.crc32 of it, so a reader takes any
window of frames with `os.pread` without reading or decoding the rest of the video. The manifest
lists per split the shards with name, index, sha256, bytes, index_sha256, videos and frames, then
totals. This module is the single source of the names and format tags; the writer imports them.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from fff_vdi.errors import DataError
from fff_vdi.utils.files import DescriptorCache

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
MANIFEST_FORMAT = "fff-vdi-shards"
REPORT_FORMAT = "fff-vdi-shard-report"
INDEX_FORMAT = "fff-vdi-shard-index"
FORMAT_VERSION = 1
SHARD_FILE = re.compile(r"(?P<split>train|val)-(?P<number>\d{6})\.(?P<ext>tar|index\.json)")  # shard_name, index_name
RESHARD_HINT = "run tools/shard_ytvos.py --verify on the folder; its --repair rewrites the shards that --verify lists"

Member = tuple[int, int, int]  # (offset of the data in the tar, size, zlib.crc32)


def frame_member_name(key: str, i: int) -> str:
    return f"{key}.f{i:05d}.jpg"


def mask_member_name(key: str, i: int) -> str:
    return f"{key}.m{i:05d}.png"


def meta_member_name(key: str) -> str:
    return f"{key}.json"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".index.json"


@dataclass(frozen=True)
class VideoEntry:
    """One video of a shard set, as its index describes it."""

    split: str
    shard: str  # tar file name, relative to the shard folder
    key: str
    video_id: str
    num_frames: int
    width: int
    height: int
    frames: tuple[Member, ...]
    masks: tuple[Member | None, ...] | None  # None: the shard set has no annotations
    json: Member


class DamagedMember(DataError):
    """From read_member: a member's bytes differ from its index entry. The message reads on from the
    member's name ("member x.f00001.jpg is cut short (...)"); `detail` alone is --verify's line."""

    def __init__(self, summary: str, detail: str):
        super().__init__(f"{summary} ({detail})")
        self.detail = detail


def read_member(fd: int, member: Member, check_crc: bool = True) -> bytes:
    """One member's bytes by offset, checked against its index entry: the length always, the crc32
    unless `check_crc` is False. The one read of the reader and of --verify; raises DamagedMember."""
    offset, size, crc = member
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise DamagedMember("cannot be read", f"{e.strerror} at offset {offset}") from None
    if len(data) != size:
        raise DamagedMember("is cut short", f"{len(data)} of {size} bytes at offset {offset} before the file ends")
    if check_crc and (actual := zlib.crc32(data)) != crc:
        raise DamagedMember("fails its crc32 check",
                            f"crc32 {actual:08x} at offset {offset} differs from the index's {crc:08x}")
    return data


class ShardSet:
    """The videos of one split of a finished shard folder, read by byte offset.

    File descriptors are opened lazily, cached per process and dropped when pickled or after a
    fork (utils.files.DescriptorCache), so DALI's parallel external source and DataLoader workers
    can carry this object.
    """

    def __init__(self, root: Path, split: str, videos: list[VideoEntry], has_masks: bool, verify_crc: bool):
        self.root = root
        self.split = split
        self.videos = videos
        self.has_masks = has_masks
        self.verify_crc = verify_crc
        self._files = DescriptorCache()

    @classmethod
    def open(cls, root: str | os.PathLike, split: str = "train", verify_crc: bool = True) -> "ShardSet":
        root = Path(root)
        manifest = load_manifest(root)
        splits = manifest["splits"]
        if split not in splits:
            raise DataError(f"{root / MANIFEST_NAME}: no split '{split}'; available: {sorted(splits)}")
        videos: list[VideoEntry] = []
        for shard in splits[split]["shards"]:
            videos.extend(_load_shard_entries(root, split, shard))
        return cls(root, split, videos, bool(manifest["with_annotations"]), verify_crc)

    def frame_name(self, video: VideoEntry, i: int) -> str:
        return frame_member_name(video.key, i)

    def read_frame(self, video: VideoEntry, i: int) -> bytes:
        return self._read(video.shard, video.frames[i], frame_member_name(video.key, i))

    def read_mask(self, video: VideoEntry, i: int) -> bytes | None:
        member = None if video.masks is None else video.masks[i]
        return None if member is None else self._read(video.shard, member, mask_member_name(video.key, i))

    def read_meta(self, video: VideoEntry) -> dict:
        return json.loads(self._read(video.shard, video.json, meta_member_name(video.key)))

    def close(self) -> None:
        self._files.close()

    def _fd(self, shard: str) -> int:
        try:
            return self._files.get(self.root / shard)
        except OSError as e:
            raise DataError(f"{self.root / shard}: cannot be opened ({e.strerror}); {RESHARD_HINT}") from None

    def _read(self, shard: str, member: Member, name: str) -> bytes:
        try:
            return read_member(self._fd(shard), member, self.verify_crc)
        except DamagedMember as e:
            raise DataError(f"{self.root / shard}: member {name} {e}; {RESHARD_HINT}") from None


def load_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(not_a_shard_folder(root)) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON ({e}); re-shard with tools/shard_ytvos.py") from e
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected "
                        f"{MANIFEST_FORMAT!r} version {FORMAT_VERSION}; re-shard with this version of "
                        "tools/shard_ytvos.py")
    return manifest


def not_a_shard_folder(root: Path) -> str:
    """What `root` is instead of a finished shard folder, and what to do; --resume only where a
    sharding run was started (its journal, report.json, is there)."""
    if not os.path.exists(root):
        return (f"{root}: no such folder (a shard folder holds {MANIFEST_NAME}); check the path, or write shards "
                f"there with tools/shard_ytvos.py --src DATASET --out {root}")
    if not root.is_dir():
        return f"{root}: a file, not a shard folder; give the folder that tools/shard_ytvos.py wrote ({MANIFEST_NAME})"
    unfinished = f"{root}: not a finished shard folder (no {MANIFEST_NAME})"
    if _is_journal(root / REPORT_NAME):
        return (f"{unfinished}: it holds an interrupted sharding run; finish it with tools/shard_ytvos.py --resume "
                f"and the --src and arguments it was started with (its {REPORT_NAME} records them)")
    return (f"{unfinished}, and no sharding run was started there (no {REPORT_NAME}); write shards there with "
            f"tools/shard_ytvos.py --src DATASET --out {root}, or give the folder that tool wrote")


def _is_journal(path: Path) -> bool:
    try:
        return json.loads(path.read_text("utf-8")).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_checked_index(root: Path, entry: dict, *, member: str, index_format: str, version: int,
                       missing_hint: str, damaged_hint: str, outdated_hint: str) -> dict:
    """The JSON index of one manifest entry of a folder laid out as tars + indexes + manifest.json (the
    image shards, and the conditioning cache made like them), after checking: the tar and its index
    exist, the index has `index_format` and `version`, and the tar's size and sha256 agree with the
    index and the manifest. `member` is what the manifest calls an entry ("shard", "unit"); the hints
    end the messages of a missing file, a damaged one and an index of another format."""
    tar_path, index_path = root / entry["name"], root / entry["index"]
    try:
        tar_bytes = tar_path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{tar_path}: {member} listed in {root / MANIFEST_NAME} is missing; {missing_hint}") from None
    try:
        index = json.loads(index_path.read_text("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{index_path}: index of {tar_path.name} is missing; {missing_hint}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{index_path}: cannot be read as JSON ({e}); {damaged_hint}") from e
    if index.get("format") != index_format or index.get("version") != version:
        raise DataError(f"{index_path}: format {index.get('format')!r} version {index.get('version')!r}, expected "
                        f"{index_format!r} version {version}; {outdated_hint}")
    if not (tar_bytes == entry["bytes"] == index["bytes"] and index["sha256"] == entry["sha256"]):
        raise DataError(f"index mismatch: {tar_path} ({tar_bytes} bytes), {index_path} ({index['bytes']} bytes, "
                        f"sha256 {index['sha256'][:12]}...) and {root / MANIFEST_NAME} ({entry['bytes']} bytes, "
                        f"sha256 {entry['sha256'][:12]}...) disagree; {damaged_hint}")
    return index


def load_index(root: Path, shard: dict) -> dict:
    """The index of one manifest shard entry, after checking it and the tar against the manifest."""
    return load_checked_index(root, shard, member="shard", index_format=INDEX_FORMAT, version=FORMAT_VERSION,
                              missing_hint=f"restore it, or re-shard with tools/shard_ytvos.py --repair {root}",
                              damaged_hint=RESHARD_HINT, outdated_hint="re-shard with tools/shard_ytvos.py")


def _load_shard_entries(root: Path, split: str, shard: dict) -> list[VideoEntry]:
    index = load_index(root, shard)
    return [
        VideoEntry(
            split=split,
            shard=shard["name"],
            key=s["key"],
            video_id=s["video_id"],
            num_frames=s["num_frames"],
            width=s["width"],
            height=s["height"],
            frames=tuple(tuple(m) for m in s["frames"]),
            masks=None if s["masks"] is None else tuple(None if m is None else tuple(m) for m in s["masks"]),
            json=tuple(s["json"]),
        )
        for s in index["samples"]
    ]
