"""Pack a YouTube-VOS style tree of JPEG frames into WebDataset shards with a byte-offset index.

Source layout: `ROOT/JPEGImages/<video>/<frame>.jpg` (ROOT may also be the `JPEGImages/` folder
itself, or any folder of `<video>/<frame>.jpg`), with object masks in `ROOT/Annotations/<video>/
<frame>.png` or `ROOT/Masks/<video>/<frame>.png` for --with-annotations. The output format is
described in `fff_vdi.data.shards`; one tar sample per video holds every frame's original JPEG bytes.

Policy for bad input (every case is recorded in report.json and the printed summary):

  frame file unreadable, zero bytes, not a JPEG (by signature and decoder), truncated or corrupt
      -> skip the frame; the video keeps its other frames in order (frame_names keeps the
         original names, so the gap stays visible to the data pipeline)
  progressive, CMYK, grayscale or other non-baseline JPEG
      -> repair: re-encode as baseline RGB JPEG, quality 95 (GPU decoders want baseline RGB)
  frame whose size differs from the video's most common frame size (ties: the earlier frame's)
      -> skip the frame
  gap or irregular step in the numbering of frame names (step = the most common difference, so
  the 6 fps release numbered 00000, 00005, ... has no gaps)
      -> keep every frame, record a note
  video with fewer frames than --min-frames (before or after skipping frames), or with none
      -> skip the video
  video id that collides with an earlier one after sanitising to [A-Za-z0-9_-]
      -> skip the later video (in sorted order)
  files in a video folder that are not .jpg/.jpeg or are hidden (such as macOS ._00000.jpg),
  hidden folders and files beside the video folders
      -> ignore, record a note
  annotation PNG missing, undecodable, or of another size than its frame
      -> that frame has no mask (mask_frames lists the frames that have one); never skips a frame
  source missing, empty or laid out otherwise, or no usable video at all
      -> exit with an error naming the path and the expected layout, and write no manifest (when
         the videos fail only once decoded, report.json says why)

Output is a pure function of the source and the arguments that shape it (not of --workers): videos
go to a split by sha1 of their id, are taken in sorted id order, and the parent process writes the
tars in that order while worker processes read, verify and repair videos and pack each one's tar
members (fff_vdi/data/tarpack.py), handing them over through shared memory (fff_vdi/data/spool.py).
Tar members carry fixed metadata. Every file is written to a temporary name and renamed; `manifest.json` comes last.
After a kill at any moment, --resume keeps the shards whose tar and index were both renamed,
removes the rest, and continues from the next video: the result is byte-identical to an
uninterrupted run. `report.json` doubles as the journal of a run in progress (its records of
finished shards are kept on resume).
"""

from __future__ import annotations

import collections
import decimal
import functools
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
import tarfile
import time
import zlib
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import fff_vdi
from fff_vdi.data.shards import (
    FORMAT_VERSION,
    INDEX_FORMAT,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    REPORT_NAME,
    frame_member_name,
    index_name,
    load_index,
    load_manifest,
    mask_member_name,
    meta_member_name,
    shard_name,
)
from fff_vdi.data.spool import Spool
from fff_vdi.data.tarpack import Member, PackedMembers, TarShardWriter, pack_members
from fff_vdi.errors import DataError, InputError
from fff_vdi.utils.atomic import atomic_open, atomic_write_json, is_temp_name, remove_temp_files
from fff_vdi.utils.parallel import map_in_order

TOOL = "tools/shard_ytvos.py"
REPORT_FORMAT = "fff-vdi-shard-report"
SPLITS = ("train", "val")
FRAME_EXTENSIONS = (".jpg", ".jpeg")
ANNOTATION_FOLDERS = ("Annotations", "Masks")
REPAIR_QUALITY = 95
EXPECTED_LAYOUT = ("expected ROOT/JPEGImages/<video>/<frame>.jpg (the dataset root), or ROOT/<video>/<frame>.jpg "
                   "(the JPEGImages folder itself)")
CRASH_ENV = "FFF_VDI_SHARD_CRASH_AT"  # test hook, see crash_point()

# Kinds of report records: a "mask" record means frames without a usable mask, a "note" changes nothing.
SKIPPED_VIDEO, SKIPPED_FRAME, REPAIRED_FRAME, DOWNSCALED_VIDEO, MASK, NOTE = (
    "skipped_video", "skipped_frame", "repaired_frame", "downscaled_video", "mask", "note")
SCAN, DECODE = "scan", "decode"  # stage that made a record: listing folders, or reading the files


# ----------------------------------------------------------------------------------------- options

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in '1GB' (10^9), '500MB', '64MiB' (2^20), '1.5GB' or '1000000'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(f"{text!r} is not a size; use e.g. 1GB, 500MB, 64MiB or a number of bytes")
    size = int(decimal.Decimal(match.group(1)) * unit)
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return size


@dataclass(frozen=True)
class ShardOptions:
    src: Path
    out: Path
    workers: int = 1
    shard_size: int = 10**9
    min_frames: int = 1
    max_side: int | None = None
    val_fraction: float = 0.0
    with_annotations: bool = False
    resume: bool = False

    def validate(self) -> None:
        checks = [("--workers", self.workers, self.workers >= 1, "use 1 or more"),
                  ("--shard-size", self.shard_size, self.shard_size >= 1, "use a positive size such as 1GB"),
                  ("--min-frames", self.min_frames, self.min_frames >= 1, "use 1 or more"),
                  ("--max-side", self.max_side, self.max_side is None or self.max_side >= 16, "use 16 or more"),
                  ("--val-fraction", self.val_fraction, 0.0 <= self.val_fraction < 1.0, "use a value in [0, 1)")]
        for flag, value, ok, fix in checks:
            if not ok:
                raise InputError(f"{flag}={value}: {fix}")

    def output_args(self) -> dict:
        """The arguments that shape the output: recorded in the manifest and compared on --resume.
        --workers, --out and --resume are left out: they do not change a byte of the result."""
        return {"src": str(self.src.resolve()), "shard_size": self.shard_size, "min_frames": self.min_frames,
                "max_side": self.max_side, "val_fraction": self.val_fraction,
                "with_annotations": self.with_annotations}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.val_fraction > 0 else SPLITS[:1]


def usable_cores() -> int:
    """Cores this process may run on (its affinity under Slurm or taskset), else all cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Worker processes for a sharding run on `cores` (default: the usable ones): one fewer than the
    cores from 8 up, where the parent (0.4 ms of CPU per frame: appending, hashing, indexing) needs
    most of a core of its own; every core below that, where another worker gains more. Measured on
    16 cores: 15 workers 2,038 frames/s, 16 workers 1,854; on 2 cores: 2 workers 313, 1 worker 200."""
    cores = usable_cores() if cores is None else cores
    return cores - 1 if cores >= 8 else max(1, cores)


def sanitize_key(video_id: str) -> str:
    """A WebDataset key without dots (the extension separator): anything outside [A-Za-z0-9_-] -> '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", video_id)


def split_of(video_id: str, val_fraction: float) -> str:
    """'val' for a stable fraction of ids (sha1, independent of Python's hash seed), else 'train'."""
    position = int.from_bytes(hashlib.sha1(video_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


def record(kind: str, stage: str, path: str, reason: str, **fields) -> dict:
    return {"kind": kind, "stage": stage, "path": path, "reason": reason, **fields}


# ------------------------------------------------------------------------------------ source scan

@dataclass(frozen=True)
class SourceLayout:
    root: Path  # dataset root: paths in the shards and the report are relative to it
    frames: Path
    annotations: Path | None

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)


def resolve_source(src: Path, with_annotations: bool) -> SourceLayout:
    """Find the frames (and annotations) folder, or raise InputError naming the path and the layout."""
    if not src.exists():
        raise InputError(f"--src {src} does not exist; {EXPECTED_LAYOUT}")
    if not src.is_dir():
        raise InputError(f"--src {src} is not a folder; {EXPECTED_LAYOUT}")
    if (src / "JPEGImages").is_dir():
        root, frames = src, src / "JPEGImages"
    elif _holds_video_folders(src):
        root, frames = (src.parent if src.name == "JPEGImages" else src), src
    else:
        raise InputError(f"--src {src}: no video folders of JPEG frames found; {EXPECTED_LAYOUT}"
                         f"{_layout_hint(src)}")
    annotations = None
    if with_annotations:
        candidates = [root / name for name in ANNOTATION_FOLDERS]
        annotations = next((p for p in candidates if p.is_dir()), None)
        if annotations is None:
            raise InputError(f"--with-annotations: no annotation folder for {frames}; expected "
                             f"{' or '.join(map(str, candidates))} holding <video>/<frame>.png")
    return SourceLayout(root, frames, annotations)


def _holds_video_folders(folder: Path) -> bool:
    return any(entry.is_dir() and _frame_files(Path(entry.path)) for entry in _scandir(folder))


def _layout_hint(src: Path) -> str:
    entries = list(_scandir(src))
    if not entries:
        return " (the folder is empty)"
    if _frame_files(src):
        return (f" (it holds {len(_frame_files(src))} JPEG files directly: put them in a <video>/ subfolder, or point "
                "--src at the folder above the video folders)")
    nested = [Path(e.path) for e in entries if e.is_dir() and (Path(e.path) / "JPEGImages").is_dir()]
    if nested:
        return f" (did you mean --src {nested[0]}?)"
    return f" (it holds: {', '.join(sorted(e.name for e in entries)[:5])}{', ...' if len(entries) > 5 else ''})"


def _scandir(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _is_frame_file(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(FRAME_EXTENSIONS) and not entry.name.startswith(".")


def _frame_files(folder: Path) -> list[str]:
    return [e.name for e in _scandir(folder) if _is_frame_file(e)]


def natural_key(name: str) -> tuple:
    """Sort '2.jpg' before '10.jpg': digit runs compare as numbers."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def numbering_note(frame_names: list[str]) -> str | None:
    """Describe gaps or irregular steps in numeric frame names, or None if the numbering is regular."""
    stems = [os.path.splitext(n)[0] for n in frame_names]
    if len(stems) < 2 or not all(s.isdigit() for s in stems):
        return None
    numbers = [int(s) for s in stems]
    steps = collections.Counter(b - a for a, b in zip(numbers, numbers[1:]))
    step = min(steps, key=lambda d: (-steps[d], d))  # most common step, ties to the smaller
    jumps = [(a, b) for a, b in zip(stems, stems[1:]) if int(b) - int(a) != step]
    if not jumps:
        return None
    listed = ", ".join(f"{a}->{b}" for a, b in jumps[:5]) + (", ..." if len(jumps) > 5 else "")
    return f"frame numbering (step {step}) jumps {len(jumps)} time(s): {listed}; frames kept in order"


@dataclass(frozen=True)
class VideoTask:
    """Everything a worker needs to read, verify and repair one video (picklable)."""

    root: str
    video_id: str
    key: str
    split: str
    frames_dir: str  # relative to root
    frame_names: tuple[str, ...]
    annotation_dir: str | None  # relative to root; None: no annotation folder for this video
    mask_names: tuple[str | None, ...] | None  # aligned with frame_names; None: the run has no annotations
    min_frames: int
    max_side: int | None


@dataclass
class Scan:
    tasks: dict[str, list[VideoTask]]  # per split, in sorted video id order
    records: list[dict]
    num_videos: int  # video folders found, usable or not


def scan_source(layout: SourceLayout, options: ShardOptions) -> Scan:
    tasks: dict[str, list[VideoTask]] = {split: [] for split in options.splits}
    records: list[dict] = []
    key_owner: dict[str, str] = {}
    num_videos = 0
    for entry in _scandir(layout.frames):
        path = Path(entry.path)
        if entry.name.startswith(".") or not entry.is_dir():
            records.append(record(NOTE, SCAN, layout.rel(path), "ignored: not a video folder"))
            continue
        num_videos += 1
        task = _scan_video(layout, options, path, key_owner, records)
        if task is not None:
            tasks[task.split].append(task)
    for split, split_tasks in tasks.items():
        if not split_tasks and num_videos:
            records.append(record(NOTE, SCAN, layout.rel(layout.frames),
                                  f"split '{split}' is empty: no usable video hashes into it"))
    return Scan(tasks, records, num_videos)


def _scan_video(layout, options, path: Path, key_owner: dict, records: list) -> VideoTask | None:
    video_id, rel = path.name, layout.rel(path)

    def skip(reason: str) -> None:
        records.append(record(SKIPPED_VIDEO, SCAN, rel, reason, video_id=video_id))

    key = sanitize_key(video_id)
    if key in key_owner:
        return skip(f"key '{key}' (the id sanitised to [A-Za-z0-9_-]) is already used by video '{key_owner[key]}'")
    try:
        entries = _scandir(path)
    except OSError as e:
        return skip(f"cannot list the folder: {e}")
    frame_names = sorted((e.name for e in entries if _is_frame_file(e)), key=natural_key)
    ignored = sorted(e.name for e in entries if not _is_frame_file(e))
    if ignored:
        records.append(record(NOTE, SCAN, rel, f"ignored {len(ignored)} entries that are not .jpg/.jpeg frames: "
                              f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}", video_id=video_id))
    if not frame_names:
        return skip("no .jpg/.jpeg frames in the folder")
    if len(frame_names) < options.min_frames:
        return skip(f"{len(frame_names)} frames, fewer than --min-frames={options.min_frames}")
    key_owner[key] = video_id
    note = numbering_note(frame_names)
    if note:
        records.append(record(NOTE, SCAN, rel, note, video_id=video_id))
    annotation_dir, mask_names = None, None
    if layout.annotations is not None:
        annotation_dir, mask_names = _scan_masks(layout, layout.annotations / video_id, frame_names, records, video_id)
    return VideoTask(str(layout.root), video_id, key, split_of(video_id, options.val_fraction), rel,
                     tuple(frame_names), annotation_dir, mask_names, options.min_frames, options.max_side)


def _scan_masks(layout, folder: Path, frame_names: list[str], records: list, video_id: str):
    rel = layout.rel(folder)
    try:
        pngs = {e.name for e in _scandir(folder) if e.is_file() and e.name.lower().endswith(".png")}
    except FileNotFoundError:
        records.append(record(MASK, SCAN, rel, "no annotation folder: no frame of this video has a mask",
                              video_id=video_id))
        return None, (None,) * len(frame_names)
    except OSError as e:
        records.append(record(MASK, SCAN, rel, f"cannot list the annotation folder ({e}): no masks",
                              video_id=video_id))
        return None, (None,) * len(frame_names)
    by_stem = {os.path.splitext(n)[0]: n for n in pngs}
    mask_names = tuple(by_stem.get(os.path.splitext(n)[0]) for n in frame_names)
    missing = mask_names.count(None)
    if missing:
        records.append(record(MASK, SCAN, rel, f"{missing} of {len(frame_names)} frames have no annotation PNG",
                              video_id=video_id))
    orphans = sorted(pngs - set(mask_names))
    if orphans:
        records.append(record(NOTE, SCAN, rel, f"ignored {len(orphans)} annotation PNGs without a frame: "
                              f"{', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}", video_id=video_id))
    return rel, mask_names


# ------------------------------------------------------------------ per-video work (in the workers)

class BadFile(Exception):
    """A frame or mask file that cannot be used; the message is the reason recorded in the report."""


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame (not DHT, JPG, DAC)
_BASELINE_SOF = 0xC0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_frame_header(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, bits per sample, number of components) of a JPEG stream, read from the marker
    segments before the first scan; None if there is none."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            return (marker, data[pos + 4], data[pos + 9]) if pos + 10 <= len(data) else None
        elif marker in (0xD9, 0xDA):  # end of image, start of scan
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _describe_non_jpeg(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "not a JPEG (PNG data)"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "not a JPEG (GIF data)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "not a JPEG (WebP data)"
    return f"not a JPEG (starts with {data[:4].hex()})"


def decode_jpeg(data: bytes) -> tuple[Image.Image, str | None]:
    """Fully decode a JPEG; returns the image and why it must be re-encoded (None: keep the bytes).
    Raises BadFile with the reason when the data is not a decodable JPEG."""
    if not data:
        raise BadFile("empty file (0 bytes)")
    if not data.startswith(b"\xff\xd8\xff"):
        raise BadFile(_describe_non_jpeg(data))
    image = _decode(data)
    if image.format not in ("JPEG", "MPO"):
        raise BadFile(f"not a JPEG (decoded as {image.format})")
    header = jpeg_frame_header(data)
    if header is None:
        raise BadFile("JPEG without a frame header")
    marker, bits, components = header
    if marker == 0xC2:
        return image, "progressive JPEG"
    if components == 4:
        return image, f"{image.mode} JPEG"
    if components == 1:
        return image, "grayscale JPEG"
    if marker != _BASELINE_SOF or bits != 8 or components != 3:
        return image, f"non-baseline JPEG (SOF 0x{marker:02X}, {bits}-bit, {components} components)"
    return image, None


def encode_jpeg(image: Image.Image, size: tuple[int, int] | None) -> bytes:
    """Baseline RGB JPEG at quality 95, resized to `size` (width, height) if given."""
    image = image.convert("RGB")
    if size is not None and size != image.size:
        image = image.resize(size, Image.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=REPAIR_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)
    return buffer.getvalue()


def downscaled_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the longer side max_side, or None when no downscale is needed."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class CheckedFrame:
    name: str
    data: bytes
    size: tuple[int, int]  # original (width, height)
    repair: str | None


@dataclass
class VideoSample:
    key: str
    video_id: str
    width: int
    height: int
    frames: list[bytes]
    masks: list[bytes | None] | None  # None: the run has no annotations
    meta: dict  # the per-sample JSON


@dataclass
class VideoResult:
    split: str
    video_id: str
    sample: PackedSample | None  # None: the video was skipped
    records: list[dict]
    bytes_read: int
    frames_read: int


def process_video(task: VideoTask, spool: Spool) -> VideoResult:
    """Read, fully decode, repair or downscale one video's frames and masks, applying the policy
    of the module docstring, and pack them as tar members (through `spool`). Runs in worker
    processes; touches nothing but the source files and the spool."""
    records: list[dict] = []
    root = Path(task.root)

    def note(kind: str, name: str, reason: str, folder: str | None = None) -> None:
        records.append(record(kind, DECODE, f"{folder or task.frames_dir}/{name}", reason,
                              video_id=task.video_id, split=task.split))

    checked: list[CheckedFrame] = []
    bytes_read = 0
    for name in task.frame_names:
        try:
            data = (root / task.frames_dir / name).read_bytes()
            bytes_read += len(data)
            image, repair = decode_jpeg(data)
        except OSError as e:
            note(SKIPPED_FRAME, name, f"cannot read ({e.strerror or e})")
            continue
        except BadFile as e:
            note(SKIPPED_FRAME, name, str(e))
            continue
        target = downscaled_size(image.size, task.max_side)
        if repair or target:
            data = encode_jpeg(image, target)
        checked.append(CheckedFrame(name, data, image.size, repair))

    size = _most_common_size(checked)
    for frame in checked:
        if frame.size != size:
            note(SKIPPED_FRAME, frame.name, f"frame is {frame.size[0]}x{frame.size[1]}, the video's frames are "
                                            f"{size[0]}x{size[1]}")
    checked = [f for f in checked if f.size == size]
    result = VideoResult(task.split, task.video_id, None, records, bytes_read, len(task.frame_names))
    skipped = len(task.frame_names) - len(checked)
    if len(checked) < task.min_frames:
        reason = (f"no usable frame (all {skipped} skipped)" if not checked else
                  f"{len(checked)} usable frames ({skipped} skipped), fewer than --min-frames={task.min_frames}")
        records.append(record(SKIPPED_VIDEO, DECODE, task.frames_dir, reason, video_id=task.video_id, split=task.split))
        return result

    for frame in checked:
        if frame.repair:
            note(REPAIRED_FRAME, frame.name, f"{frame.repair} re-encoded as baseline RGB (quality {REPAIR_QUALITY})")
    target = downscaled_size(size, task.max_side)
    if target:
        records.append(record(DOWNSCALED_VIDEO, DECODE, task.frames_dir, f"{size[0]}x{size[1]} downscaled to "
                              f"{target[0]}x{target[1]} (--max-side={task.max_side})", video_id=task.video_id,
                              split=task.split))
    masks = None
    if task.mask_names is not None:
        mask_of = dict(zip(task.frame_names, task.mask_names))
        masks = [_read_mask(root, task, mask_of[f.name], size, target, note) for f in checked]
    width, height = target or size
    meta = {
        "video_id": task.video_id,
        "key": task.key,
        "source": task.frames_dir,
        "frame_names": [f.name for f in checked],
        "width": width,
        "height": height,
        "num_frames": len(checked),
        "repaired": [i for i, f in enumerate(checked) if f.repair],
        "downscaled": target is not None,
        "mask_frames": [] if masks is None else [i for i, m in enumerate(masks) if m is not None],
        "annotation_source": task.annotation_dir,
    }
    frames = [f.data for f in checked]
    sample = VideoSample(task.key, task.video_id, width, height, frames, masks, meta)
    result.sample = pack_sample(sample, spool)
    return result


def _most_common_size(frames: list[CheckedFrame]) -> tuple[int, int] | None:
    sizes = collections.Counter(f.size for f in frames)
    return max(sizes, key=sizes.__getitem__, default=None)  # ties: the earliest (Counter keeps first-seen order)


def decode_png(data: bytes) -> Image.Image:
    """Fully decode a PNG; raises BadFile with the reason when it is not a decodable PNG."""
    if not data.startswith(_PNG_SIGNATURE):
        raise BadFile("empty file (0 bytes)" if not data else f"not a PNG (starts with {data[:4].hex()})")
    return _decode(data)


def _decode(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:  # its message holds an object address, which would make reports differ
        raise BadFile("cannot decode (no image format recognised)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken streams
        raise BadFile(f"cannot decode ({type(e).__name__}: {e})") from None
    return image


def _read_mask(root: Path, task: VideoTask, name: str | None, frame_size, target, note) -> bytes | None:
    """The mask's PNG bytes (resized with the frame when downscaling), or None when the frame has no
    usable mask (recorded)."""
    if name is None:
        return None
    try:
        data = (root / task.annotation_dir / name).read_bytes()
        image = decode_png(data)
    except OSError as e:
        note(MASK, name, f"cannot read ({e.strerror or e}): the frame has no mask", task.annotation_dir)
        return None
    except BadFile as e:
        note(MASK, name, f"{e}: the frame has no mask", task.annotation_dir)
        return None
    if image.size != frame_size:
        note(MASK, name, f"mask is {image.size[0]}x{image.size[1]}, its frame is {frame_size[0]}x{frame_size[1]}: "
                         "the frame has no mask", task.annotation_dir)
        return None
    if target is None:
        return data
    buffer = io.BytesIO()  # nearest neighbour keeps object ids (and the palette) intact
    image.resize(target, Image.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- tar writing

def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sample_members(sample: VideoSample) -> list[Member]:
    """The tar members of one video, in sorted name order: frames, JSON, masks."""
    members = [Member(frame_member_name(sample.key, i), data) for i, data in enumerate(sample.frames)]
    members.append(Member(meta_member_name(sample.key), json_bytes(sample.meta)))
    if sample.masks is not None:
        members += [Member(mask_member_name(sample.key, i), data)
                    for i, data in enumerate(sample.masks) if data is not None]
    return members


@dataclass
class PackedSample:
    """One video as the worker hands it to the parent: its members packed as they stand in the tar."""

    key: str
    video_id: str
    width: int
    height: int
    num_frames: int
    has_masks: bool
    members: PackedMembers


def pack_sample(sample: VideoSample, spool: Spool) -> PackedSample:
    return PackedSample(sample.key, sample.video_id, sample.width, sample.height, len(sample.frames),
                        sample.masks is not None, pack_members(sample_members(sample), spool))


def write_sample(tar: TarShardWriter, sample: PackedSample) -> dict:
    """Append one video's members; returns its index entry."""
    start = tar.append(sample.members)
    where = {name: [start + offset, size, crc] for name, (offset, size, crc) in sample.members.where.items()}
    key, n = sample.key, sample.num_frames
    return {
        "key": key,
        "video_id": sample.video_id,
        "num_frames": n,
        "width": sample.width,
        "height": sample.height,
        "json": where[meta_member_name(key)],
        "frames": [where[frame_member_name(key, i)] for i in range(n)],
        "masks": [where.get(mask_member_name(key, i)) for i in range(n)] if sample.has_masks else None,
    }


def crash_point(name: str, _arrivals: collections.Counter = collections.Counter()) -> None:
    """Test hook: with FFF_VDI_SHARD_CRASH_AT=<name>[:<n>] in the environment, the n-th arrival at
    `name` kills this process with SIGKILL, exactly like `kill -9` (used by the --resume tests)."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        point, _, count = spec.partition(":")
        if point == name:
            _arrivals[name] += 1
            if _arrivals[name] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)


class _Lookahead:
    """An iterator whose next item can be looked at without taking it."""

    _NOTHING = object()

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self._next = self._NOTHING

    def peek(self):
        if self._next is self._NOTHING:
            self._next = next(self._items, None)
        return self._next

    def take(self):
        item, self._next = self.peek(), self._NOTHING
        return item


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


class ShardWriter:
    """Writes the videos of a run into shards, in the order given, filling each to `shard_size`."""

    def __init__(self, out: Path, shard_size: int, journal: Journal, progress: "Progress"):
        self.out, self.shard_size, self.journal, self.progress = out, shard_size, journal, progress

    def write_split(self, split: str, results: Iterable[VideoResult], first_number: int) -> list[dict]:
        """Consume one split's results; returns the indexes of the shards written."""
        results = _Lookahead(results)
        indexes = []
        while self._skip_to_next_sample(results):
            indexes.append(self._write_shard(shard_name(split, first_number + len(indexes)), results))
        return indexes

    def _skip_to_next_sample(self, results: _Lookahead) -> bool:
        while results.peek() is not None and results.peek().sample is None:
            self._consume(results.take())
        return results.peek() is not None

    def _write_shard(self, name: str, results: _Lookahead) -> dict:
        samples = []
        with atomic_open(self.out / name) as file:
            tar = TarShardWriter(file)
            try:
                while (result := results.peek()) is not None:
                    if result.sample is not None:
                        if samples and tar.size_with(result.sample.members.size) > self.shard_size:
                            break  # the shard is full; this video starts the next one
                        samples.append(write_sample(tar, result.sample))
                        crash_point("sample-written")
                    self._consume(results.take())
                size = tar.close()
            finally:
                tar.stop()
            self.journal.save()
            crash_point("tar-written")
        crash_point("tar-renamed")
        index = {"format": INDEX_FORMAT, "version": FORMAT_VERSION, "shard": name, "bytes": size,
                 "sha256": tar.sha256.hexdigest(), "samples": samples}
        atomic_write_json(self.out / index_name(name), index, indent=None)
        crash_point("index-written")
        return index

    def _consume(self, result: VideoResult) -> None:
        self.journal.records.extend(result.records)
        self.progress.update(result)


class Progress:
    """tqdm bar over videos with frames/s and MB/s read from the source."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="video", dynamic_ncols=True, smoothing=0.05,
                        mininterval=0.5 if sys.stderr.isatty() else 30)
        self.start, self.frames, self.bytes = time.perf_counter(), 0, 0

    def update(self, result: VideoResult) -> None:
        self.frames += result.frames_read
        self.bytes += result.bytes_read
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.frames / elapsed:.0f} frames/s, {self.bytes / elapsed / 1e6:.1f} MB/s",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------- output and resume

_SHARD_FILE = re.compile(r"(?P<split>train|val)-(?P<number>\d{6})\.(?P<ext>tar|index\.json)")
FRESH, RESUMING, FINISHED = "fresh", "resuming", "finished"


def output_state(options: ShardOptions) -> str:
    """FRESH, RESUMING or FINISHED; raises InputError when the folder may not be used as asked."""
    out = options.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pick a folder")
    names = sorted(p.name for p in out.iterdir() if not is_temp_name(p)) if out.is_dir() else []
    if not names:
        return FRESH
    foreign = [n for n in names if n not in (MANIFEST_NAME, REPORT_NAME) and not _SHARD_FILE.fullmatch(n)]
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
        recorded = _load_json(out / REPORT_NAME)["args"]
    else:
        raise InputError(f"--out {out} holds shards but no {REPORT_NAME}, so it cannot be resumed; "
                         "pick an empty folder")
    wanted = options.output_args()
    changed = [f"{k}: {recorded.get(k)!r} then, {v!r} now" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise InputError(f"--resume: {out} was made with other arguments ({'; '.join(changed)}); "
                         "rerun with the same arguments, or pick an empty folder")
    return FINISHED if finished else RESUMING


def _load_json(path: Path) -> dict:
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
        loaded = _load_json(index)
        if loaded.get("shard") != name or loaded.get("bytes") != tar.stat().st_size:
            break
        indexes.append(loaded)
    for path in sorted(out.iterdir()):
        match = _SHARD_FILE.fullmatch(path.name)
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


# -------------------------------------------------------------------------------------------- run

@dataclass
class RunSummary:
    out: Path
    state: str  # FRESH, RESUMING or FINISHED (nothing was done)
    report: dict | None = None
    manifest: dict | None = None


def run_sharding(options: ShardOptions) -> RunSummary:
    """Shard `options.src` into `options.out` (see the module docstring); raises InputError when
    nothing usable is found or the output folder may not be used."""
    options.validate()
    layout = resolve_source(options.src, options.with_annotations)
    state = output_state(options)
    if state == FINISHED:
        print(f"{options.out} is already finished with these arguments; nothing to do "
              f"(run --verify {options.out} to check it)")
        return RunSummary(options.out, state)
    if state == FRESH and options.resume:
        print(f"resume: {options.out} holds no earlier run; starting a new one")
    scan = scan_source(layout, options)
    if not any(scan.tasks.values()):
        _print_records(scan.records, [SKIPPED_VIDEO])
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
        indexes, start, journal.records = _resume(options, scan)
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
                                       **{name: _count(journal.records, kind) for name, kind in counts.items()}})
    crash_point("report-finished")
    print_summary(report, manifest, options.out)
    if manifest["totals"]["videos"] == 0:
        raise InputError(f"--src {options.src}: no usable video; all {scan.num_videos} were skipped (see "
                         f"{journal.path}); {EXPECTED_LAYOUT}")
    atomic_write_json(options.out / MANIFEST_NAME, manifest)
    return RunSummary(options.out, state, report, manifest)


def _resume(options: ShardOptions, scan: Scan) -> tuple[dict, dict, list[dict]]:
    """Per split, the finished shards' indexes and the position to continue from; and the journal's
    records of the videos before those positions."""
    indexes = {split: finished_shards(options.out, split) for split in options.splits}
    start = {split: resume_point(options.out, scan.tasks[split], indexes[split]) for split in options.splits}
    records = _records_before(_load_json(options.out / REPORT_NAME)["records"], scan.tasks, start)
    print(f"resume: {sum(map(len, indexes.values()))} shards finished; continuing after {sum(start.values())} of "
          f"{sum(map(len, scan.tasks.values()))} videos")
    return indexes, start, records


def _records_before(records: list[dict], tasks: dict[str, list[VideoTask]], start: dict[str, int]) -> list[dict]:
    """The journal's records of videos before the resume point (later ones are made again)."""
    position = {(task.split, task.video_id): i for split_tasks in tasks.values() for i, task in enumerate(split_tasks)}
    return [r for r in records if r["stage"] == DECODE
            and position.get((r["split"], r["video_id"]), len(position)) < start[r["split"]]]


def _in_plan_order(records: list[dict], tasks: dict[str, list[VideoTask]]) -> list[dict]:
    """Decode records sorted by split and video position (stable: a video's own order is kept), so a
    resumed run lists them exactly as an uninterrupted one."""
    position = {(task.split, task.video_id): (SPLITS.index(split), i)
                for split, split_tasks in tasks.items() for i, task in enumerate(split_tasks)}
    return sorted(records, key=lambda r: position[(r["split"], r["video_id"])])


def _count(records: list[dict], kind: str) -> int:
    return sum(r["kind"] == kind for r in records)


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
                   "bytes": sum(s["bytes"] for s in all_shards), "skipped_videos": _count(records, SKIPPED_VIDEO),
                   "skipped_frames": _count(records, SKIPPED_FRAME),
                   "repaired_frames": _count(records, REPAIRED_FRAME)},
    }


# ----------------------------------------------------------------------------------------- report

_LABELS = {SKIPPED_VIDEO: "skipped videos", SKIPPED_FRAME: "skipped frames", REPAIRED_FRAME: "repaired frames",
           DOWNSCALED_VIDEO: "downscaled videos", MASK: "mask notes (frames without a usable mask)", NOTE: "notes"}


def _print_records(records: list[dict], kinds: list[str], limit: int | None = None) -> None:
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
    _print_records(report["records"], [SKIPPED_VIDEO, SKIPPED_FRAME])
    _print_records(report["records"], [REPAIRED_FRAME, DOWNSCALED_VIDEO, MASK, NOTE], limit=5)
    print(f"report: {out / REPORT_NAME}")


# ----------------------------------------------------------------------------------------- verify

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
                       if _SHARD_FILE.fullmatch(path.name) and path.name not in listed]
    return total


def verify_shard(job: tuple[str, dict, bool]) -> ShardCheck:
    root, shard, with_annotations = job
    root = Path(root)
    tar_path, index_path = root / shard["name"], root / shard["index"]
    check = ShardCheck([])

    def problem(reason: str, member: str | None = None, path: Path = tar_path) -> None:
        check.problems.append(f"{path}: " + (f"member {member}: " if member else "") + reason)

    for path, digest, size in ((tar_path, shard["sha256"], shard["bytes"]), (index_path, shard["index_sha256"], None)):
        if not path.is_file():
            problem(f"missing (listed in {MANIFEST_NAME})", path=path)
            return check
        if size is not None and path.stat().st_size != size:
            problem(f"{path.stat().st_size} bytes, {MANIFEST_NAME} says {size}", path=path)
        if sha256_file(path) != digest:
            problem(f"sha256 differs from {MANIFEST_NAME}'s", path=path)
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
        offset, length, crc = member
        data = os.pread(fd, length, offset)
        if len(data) != length:
            problem(f"cut short: {len(data)} of {length} bytes at offset {offset}", name)
        elif zlib.crc32(data) != crc:
            problem(f"crc32 {zlib.crc32(data):08x} differs from the index's {crc:08x}", name)
        else:
            return data
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
