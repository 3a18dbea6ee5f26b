"""Find the source layout and list every video's frames and masks, without decoding anything."""

from __future__ import annotations

import collections
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fff_vdi.errors import InputError
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.records import MASK, NOTE, SCAN, SKIPPED_VIDEO, record
from fff_vdi.utils.paths import natural_key

FRAME_EXTENSIONS = (".jpg", ".jpeg")
ANNOTATION_FOLDERS = ("Annotations", "Masks")
EXPECTED_LAYOUT = ("expected ROOT/JPEGImages/<video>/<frame>.jpg (the dataset root), or ROOT/<video>/<frame>.jpg "
                   "(the JPEGImages folder itself)")


def sanitize_key(video_id: str) -> str:
    """A WebDataset key without dots (the extension separator): anything outside [A-Za-z0-9_-] -> '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", video_id)


def split_of(video_id: str, val_fraction: float) -> str:
    """'val' for a stable fraction of ids (sha1, independent of Python's hash seed), else 'train'."""
    position = int.from_bytes(hashlib.sha1(video_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


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
