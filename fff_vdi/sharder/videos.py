"""One video -> one packed tar sample: read, check, repair or downscale its frames and masks, and
lay out its tar members. Runs in the worker processes; touches nothing but the source and the spool."""

from __future__ import annotations

import collections
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fff_vdi.data.shards import frame_member_name, mask_member_name, meta_member_name
from fff_vdi.sharder.frames import REPAIR_QUALITY, BadFile, decode_jpeg, decode_png, downscaled_size, encode_jpeg
from fff_vdi.sharder.records import DECODE, DOWNSCALED_VIDEO, MASK, REPAIRED_FRAME, SKIPPED_FRAME, SKIPPED_VIDEO, record
from fff_vdi.sharder.scan import VideoTask
from fff_vdi.sharder.spool import Spool
from fff_vdi.sharder.tarpack import Member, PackedMembers, pack_members


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
    of `fff_vdi.sharder`, and pack them as tar members (through `spool`). Runs in worker
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
