"""Pictures for the page: masks and clicks drawn over frames, browser-playable previews, zips.

Previews are VP8 WebM (Chromium, Firefox and Safari play it; OpenCV's FFmpeg has no H.264
encoder and browsers do not play its MPEG-4 part 2 mp4s), with each panel at most PREVIEW_WIDTH
wide: they are for looking at; the downloads keep the full resolution.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from fff_vdi.inference.segmentation import Click
from fff_vdi.inference.video_io import resize_rgb, write_mp4
from fff_vdi.utils.atomic import atomic_open

PREVIEW_CODEC = "VP80"
PREVIEW_WIDTH = 480
# Object k is drawn in OBJECT_COLOURS[(k - 1) % len]: bright, and apart from each other.
OBJECT_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220))
POSITIVE, NEGATIVE = (0, 230, 0), (255, 40, 40)


def object_colour(object_id: int) -> tuple[int, int, int]:
    return OBJECT_COLOURS[(object_id - 1) % len(OBJECT_COLOURS)]


def overlay_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The frame with each object's pixels tinted in its colour, and its outline drawn."""
    out = rgb.astype(np.float32)
    for object_id in np.unique(labels[labels > 0]):
        inside = labels == object_id
        out[inside] = (1 - alpha) * out[inside] + alpha * np.asarray(object_colour(int(object_id)), np.float32)
    out = np.rint(out).astype(np.uint8)
    for object_id in np.unique(labels[labels > 0]):
        contours, _ = cv2.findContours((labels == object_id).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, object_colour(int(object_id)), 1)
    return out


def draw_clicks(rgb: np.ndarray, clicks: Sequence[tuple[int, Click]]) -> np.ndarray:
    """(object id, click) markers: a filled disc (green on the object, red not on it) ringed in the object's colour."""
    out = rgb.copy()
    radius = max(4, round(min(rgb.shape[:2]) / 60))
    for object_id, click in clicks:
        centre = (round(click.x), round(click.y))
        cv2.circle(out, centre, radius + 2, object_colour(object_id), -1, cv2.LINE_AA)
        cv2.circle(out, centre, radius, POSITIVE if click.positive else NEGATIVE, -1, cv2.LINE_AA)
    return out


def preview_panel(rgb: np.ndarray, width: int = PREVIEW_WIDTH) -> np.ndarray:
    if rgb.shape[1] <= width:
        return rgb
    height = 2 * round(rgb.shape[0] * width / rgb.shape[1] / 2)
    return resize_rgb(rgb, (height, width))


def write_preview(path: Path, panels: Iterable[Sequence[np.ndarray]], fps: float) -> Path:
    """A WebM of the frames' panels side by side (each made at most PREVIEW_WIDTH wide)."""
    write_mp4(path, (np.concatenate([preview_panel(p) for p in frame_panels], axis=1) for frame_panels in panels), fps, codec=PREVIEW_CODEC)
    return path


def zip_files(path: Path, files: Sequence[Path]) -> Path:
    """The files (stored: PNGs do not compress further) in a zip, written whole or not at all."""
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in files:
            archive.write(file, arcname=file.name)
    return path
