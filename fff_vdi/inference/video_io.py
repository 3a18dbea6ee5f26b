"""Videos and masks on disk, and the uint8 image operations around the model.

A video is a folder of frames (jpg/png/bmp, in natural order: 2.png before 10.png), a video file
(mp4, avi, mov, mkv, webm), or a YouTube-VOS / DAVIS dataset root with a video id
(`ROOT/JPEGImages/<id>/`). Masks are a folder of images with one image per frame (nonzero = hole;
palette PNGs such as YouTube-VOS `Annotations/<id>/` count every object index as hole), one image
used for every frame (a logo or watermark that does not move), a mask video (brighter than 127 =
hole: lossy codecs blur the exact zeros), or a dataset root with the same id (`Annotations/<id>/`
or `Masks/<id>/`).

Sources read their frames on demand, in order, so that a long video never has to sit in memory at
full resolution. Frames are RGB uint8 (H, W, 3), masks bool (H, W). Every problem with the input
is an `InputError` that names the file and the fix.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from fff_vdi.errors import InputError
from fff_vdi.utils.atomic import TMP_MARK, fsync_dir
from fff_vdi.utils.paths import natural_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_DIRS = ("JPEGImages",)  # dataset layouts: ROOT/JPEGImages/<id>/
MASK_DIRS = ("Annotations", "Masks")  # ROOT/Annotations/<id>/ (YouTube-VOS) or ROOT/Masks/<id>/ (DAVIS sample)
MASK_VIDEO_THRESHOLD = 127


def image_files(folder: Path) -> list[Path]:
    images = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(images, key=lambda p: natural_key(p.name))


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())


# ----------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class FrameSource:
    """A video on disk: image files in order, or one video file decoded in order."""

    path: Path
    files: tuple[Path, ...]  # empty for a video file
    num_frames: int
    height: int
    width: int
    fps: float | None  # None for a folder of frames

    def __len__(self) -> int:
        return self.num_frames

    def frames(self) -> Iterator[np.ndarray]:
        """RGB uint8 (H, W, 3) frames in order; each must have the source's size."""
        raw = (read_rgb(f) for f in self.files) if self.files else _decode_video(self.path)
        for index, frame in enumerate(raw):
            where = self.files[index] if self.files else f"{self.path} frame {index}"
            _check_size(frame.shape[:2], (self.height, self.width), where, f"the first frame of {self.path}")
            yield frame


@dataclass(frozen=True)
class MaskSource:
    """Hole masks on disk: image files in order, or one mask video."""

    path: Path
    files: tuple[Path, ...]  # empty for a mask video
    num_frames: int
    height: int  # of the first mask
    width: int

    def __len__(self) -> int:
        return self.num_frames

    def masks(self, size: tuple[int, int], reference: str = "its video frame") -> Iterator[np.ndarray]:
        """bool (H, W) masks in order, True = hole; each must have `size` (that of `reference`)."""
        if self.files:
            raw = (read_mask(f) for f in self.files)
        else:
            raw = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) > MASK_VIDEO_THRESHOLD for f in _decode_video(self.path))
        for index, mask in enumerate(raw):
            where = self.files[index] if self.files else f"{self.path} frame {index}"
            _check_size(mask.shape, size, where, reference)
            yield mask


def open_video(path: str | Path, video_id: str | None = None) -> FrameSource:
    """A frame folder, a video file, or (with `video_id`) a dataset root's JPEGImages/<id>/."""
    path = _existing(path, "--video")
    if video_id is not None:
        path = _dataset_member(path, video_id, FRAME_DIRS, "--video")
    if is_video_file(path):
        num_frames, height, width, fps = _probe_video(path)
        return FrameSource(path, (), num_frames, height, width, fps)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InputError(
                f"--video {path}: no frames ({', '.join(IMAGE_SUFFIXES)}) in this folder; for a dataset root "
                f"(with JPEGImages/<id>/) pass --video-id"
            )
        width, height = _image_size(files[0])
        return FrameSource(path, tuple(files), len(files), height, width, None)
    raise InputError(f"--video {path}: not a folder of frames or a video file ({', '.join(VIDEO_SUFFIXES)})")


def open_masks(path: str | Path | None, video_id: str | None = None, num_frames: int | None = None) -> MaskSource:
    """A mask folder, a mask video, (with `video_id`) a dataset root's Annotations/<id>/ or Masks/<id>/,
    or (with `num_frames`, the video's length) one mask image that holds for every frame."""
    if path is None:
        raise InputError("--masks is required: a folder with one mask PNG per frame (nonzero = hole), one mask image "
                         "for every frame, or a mask video")
    path = _existing(path, "--masks")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        if num_frames is None:
            raise InputError(f"--masks {path}: one mask image is not accepted here: give one mask per frame (a folder or a mask video)")
        width, height = _image_size(path)
        return MaskSource(path, (path,) * num_frames, num_frames, height, width)
    if video_id is not None and not is_frame_folder(path) and not is_video_file(path):
        path = _dataset_member(path, video_id, MASK_DIRS, "--masks")
    if is_video_file(path):
        num_frames, height, width, _ = _probe_video(path)
        return MaskSource(path, (), num_frames, height, width)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InputError(f"--masks {path}: no mask images in this folder (expected one PNG per frame, nonzero = hole)")
        width, height = _image_size(files[0])
        return MaskSource(path, tuple(files), len(files), height, width)
    raise InputError(f"--masks {path}: not a folder of mask images, a mask image or a mask video ({', '.join(VIDEO_SUFFIXES)})")


def is_inpaint_output(path: Path) -> bool:
    """A folder written by `python -m fff_vdi.inpaint` (its frames are in frames/)."""
    return (path / "frames").is_dir() and (path / "inpainted.mp4").is_file()


def find_videos(path: str | Path, flag: str, dataset_dirs: tuple[str, ...] = FRAME_DIRS) -> dict[str, Path]:
    """{name: video path} for one video or a folder of videos.

    One video: a frame folder, a video file, or an inpaint output folder. A collection: a folder of
    those, or a dataset root holding one of `dataset_dirs` (JPEGImages/ for frames, Annotations/ or
    Masks/ for masks). Names are folder names and video file stems.
    """
    path = _existing(path, flag)
    for sub in dataset_dirs:
        if (path / sub).is_dir():
            path = path / sub
            break
    single = _as_video(path)
    if single is not None:
        return {path.stem if path.is_file() else path.name: single}
    videos = {}
    for entry in sorted(path.iterdir(), key=lambda p: natural_key(p.name)):
        video = _as_video(entry)
        if video is not None:
            videos[entry.stem if entry.is_file() else entry.name] = video
    if not videos:
        raise InputError(f"{flag} {path}: neither a video (frame folder, video file) nor a folder of videos")
    return videos


def _as_video(path: Path) -> Path | None:
    if is_video_file(path) or is_frame_folder(path):
        return path
    if path.is_dir() and is_inpaint_output(path):
        return path / "frames"
    return None


def check_same_length(video: FrameSource, masks: MaskSource) -> None:
    if len(video) == len(masks):
        return
    detail = ""
    if video.files and masks.files:
        video_stems, mask_stems = [f.stem for f in video.files], {f.stem for f in masks.files}
        missing = [s for s in video_stems if s not in mask_stems]
        if missing:
            detail = f" (no mask for frames {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
    raise InputError(
        f"{video.path} has {len(video)} frames but {masks.path} has {len(masks)} masks{detail}: "
        f"give exactly one mask per frame (YouTube-VOS validation annotates only the first frame; use full masks)"
    )


# ----------------------------------------------------------------------------------------------
# reading


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{path}: cannot be read as an image (missing, corrupt or not an image): replace or remove it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """True where the mask is nonzero. Palette images give their indices (object ids), not colours."""
    try:
        with Image.open(path) as image:
            values = np.asarray(image)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: cannot be read as a mask image ({e}): replace it with a PNG (nonzero = hole)") from e
    if values.ndim == 3:
        return values[..., :3].any(axis=-1)
    return values != 0


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: cannot be read as an image ({e}): replace or remove it") from e


def _probe_video(path: Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps), counting frames by decoding (container frame counts can be wrong)."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"{path}: OpenCV cannot open this video: convert it to mp4 (H.264) or pass a folder of frames")
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        num_frames, size = 0, None
        while capture.grab():
            num_frames += 1
        if num_frames:
            size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    finally:
        capture.release()
    if not num_frames or not size or min(size) <= 0:
        raise InputError(f"{path}: no decodable frames: the file is empty or corrupt")
    return num_frames, size[0], size[1], fps if fps > 0 else None


def _decode_video(path: Path) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def _existing(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file or folder")
    return path


def _dataset_member(root: Path, video_id: str, subdirs: tuple[str, ...], flag: str) -> Path:
    for sub in subdirs:
        candidate = root / sub / video_id
        if candidate.is_dir():
            return candidate
    wanted = " or ".join(f"{root / sub / video_id}" for sub in subdirs)
    raise InputError(f"{flag} {root} with --video-id {video_id}: {wanted} does not exist: check the dataset root and the id")


def _check_size(actual: tuple[int, int], expected: tuple[int, int], where, reference: str) -> None:
    if tuple(actual) != tuple(expected):
        raise InputError(
            f"{where} is {actual[1]}x{actual[0]} (WxH) but {reference} is {expected[1]}x{expected[0]}: "
            f"all frames and masks of a video must have the same size (resize the masks with nearest-neighbour interpolation)"
        )


# ----------------------------------------------------------------------------------------------
# image operations

TRAINING_SIZE = (256, 512)  # (H, W) the published FFF-VDI was trained at
SIZE_MULTIPLE = 8  # the VAE's downsampling factor
MIN_SIDE = 128  # RAFT's four-level correlation pyramid below 1/8 resolution


def model_frame_size(height: int, width: int, area: int = TRAINING_SIZE[0] * TRAINING_SIZE[1]) -> tuple[int, int]:
    """(H, W) for the model: the video's aspect ratio at the training size's pixel count (512 x 256),
    each side rounded to a multiple of 8 and at least 128.

    Keeping the pixel count (rather than fitting inside 512 x 256) gives portrait and landscape
    videos the same detail and the same memory: 432x240 -> 488x272, 1920x1080 -> 480x272,
    1080x1920 -> 272x480.
    """
    scale = (area / (height * width)) ** 0.5
    return tuple(max(MIN_SIDE, SIZE_MULTIPLE * round(side * scale / SIZE_MULTIPLE)) for side in (height, width))


def check_model_frame_size(height: int, width: int) -> None:
    for flag, side in (("--height", height), ("--width", width)):
        if side % SIZE_MULTIPLE or side < MIN_SIDE:
            raise InputError(f"{flag} {side}: the model needs a multiple of {SIZE_MULTIPLE} of at least {MIN_SIDE} (RAFT's limit)")



def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB resized to (H, W): area averaging when shrinking, bicubic when enlarging."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    shrinking = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def resize_hole(hole: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Conservative mask resize: a pixel is hole if any hole pixel falls into its footprint, so the
    model regenerates everything that the full-resolution composite takes from it."""
    if hole.shape == tuple(size):
        return hole
    return cv2.resize(hole.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA) > 0


def dilate_hole(hole: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the hole by `pixels` (elliptical structuring element); 0 leaves it unchanged."""
    if pixels <= 0:
        return hole
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(hole.astype(np.uint8), kernel).astype(bool)


def to_uint8_rgb(frame_chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A model frame (3, h, w) in [-1, 1] as uint8 RGB (H, W, 3), resized in float (bicubic) before rounding."""
    rgb = (np.transpose(frame_chw, (1, 2, 0)).astype(np.float32) + 1.0) * 127.5
    if rgb.shape[:2] != tuple(size):
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def composite(original: np.ndarray, generated: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The generated pixels inside the hole, the original pixels (bit-identical) everywhere else."""
    return np.where(hole[..., None], generated, original)


def overlay_hole(rgb: np.ndarray, hole: np.ndarray, color=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """The frame with the hole tinted, for the comparison video."""
    tinted = rgb.astype(np.float32)
    tinted[hole] = (1 - alpha) * tinted[hole] + alpha * np.asarray(color, np.float32)
    return np.rint(tinted).astype(np.uint8)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.concatenate([left, right], axis=1)


# ----------------------------------------------------------------------------------------------
# writing


def write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: OpenCV could not write the PNG (check the folder's permissions and free space)")


class Mp4Writer:
    """An mp4 (MPEG-4 part 2, 'mp4v': the codec every OpenCV build has) written frame by frame; with
    codec="VP80" and a .webm path, a VP8 WebM (what browsers play; OpenCV's FFmpeg has no H.264 encoder).

    Odd frame sizes are padded by one replicated row/column: the encoder needs even sizes and
    would otherwise crop.
    """

    def __init__(self, path: Path, fps: float, height: int, width: int, codec: str = "mp4v"):
        self.path = path
        self.size = (height + height % 2, width + width % 2)
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), float(fps), (self.size[1], self.size[0]))
        if not self.writer.isOpened():
            raise OSError(f"{path}: OpenCV cannot open a {codec} writer (fps {fps}, {width}x{height}): check the folder and the OpenCV build")

    def write(self, rgb: np.ndarray) -> None:
        pad_h, pad_w = self.size[0] - rgb.shape[0], self.size[1] - rgb.shape[1]
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(path: str | Path, frames_thwc: Iterable[np.ndarray], fps: float, codec: str = "mp4v") -> None:
    """uint8 RGB frames (H, W, 3) as an mp4 (or, with codec="VP80", a .webm), written under a temporary
    name and renamed when complete."""
    path = Path(path)
    frames = iter(frames_thwc)
    first = next(frames)
    tmp = path.with_name(f"{path.stem}{TMP_MARK}{secrets.token_hex(4)}{path.suffix}")  # OpenCV picks the container by suffix
    try:
        with Mp4Writer(tmp, fps, *first.shape[:2], codec=codec) as writer:
            writer.write(first)
            for frame in frames:
                writer.write(frame)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
