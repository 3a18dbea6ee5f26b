"""Masks from clicks: SAM2 carries a few clicks on some frames through the whole video.

A click is `x,y[,label][@frame]`: a pixel of the video (x to the right, y down, from the top-left
corner), label 1 (on the object, the default) or 0 (not on it), and the frame it is on (0-based,
default 0). Each object has its own clicks and gets the id 1, 2, ... in the order given.

SAM2 segments each object on the frames it was clicked on, then propagates forward from its first
clicked frame to the end and backward from there to the start, so every frame gets a mask whichever
frame was clicked. Objects whose first clicks are on the same frame share one pass (one image
encoding per frame); SAM2 cannot track an object before it has a mask, so objects starting on other
frames get their own passes.

The result is a label map per frame (uint8: 0 background, k = object k; where objects overlap, the
higher id). Written as palette PNGs (the DAVIS / YouTube-VOS annotation format, object k in the
standard colour k), which `python -m fff_vdi.inpaint --masks` reads as holes (every nonzero index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from fff_vdi.errors import InputError
from fff_vdi.inference.video_io import dilate_hole

CLICK_PATTERN = re.compile(r"^\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*(?:,\s*([01])\s*)?(?:@\s*(-?\d+)\s*)?$")
CLICK_SYNTAX = "x,y[,label][@frame] (pixels from the top-left corner; label 1 = object, 0 = not object; frame from 0)"
PROCESS_FRAMES_PER_CALL = 16  # frames resized and normalised together for SAM2
FrameCallback = Callable[[int, int], None]  # (frames done, frames in all)


@dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool = True
    frame: int = 0

    def __str__(self) -> str:
        return f"{self.x:g},{self.y:g},{int(self.positive)}@{self.frame}"


def parse_click(text: str) -> Click:
    match = CLICK_PATTERN.match(text)
    try:
        if match is None:
            raise ValueError
        x, y, label, frame = match.groups()
        return Click(float(x), float(y), label != "0", int(frame) if frame is not None else 0)
    except ValueError:
        raise InputError(f"--points {text!r}: expected {CLICK_SYNTAX}, e.g. 120,80 or 120,80,0@15") from None


def check_clicks(objects: Sequence[Sequence[Click]], num_frames: int, height: int, width: int) -> None:
    """Every object has a click on the object, inside the frame, on a frame of the video."""
    if not objects or not all(objects):
        raise InputError(f"no clicks: give each object at least one click, --points {CLICK_SYNTAX}")
    for number, clicks in enumerate(objects, start=1):
        for click in clicks:
            check_click_position(click, f"--points {click} (object {number})", num_frames, height, width)
        if not any(click.positive for click in clicks):
            raise InputError(f"object {number} has only negative clicks (label 0): add a click on the object (label 1)")


def check_click_position(click: Click, where: str, num_frames: int, height: int, width: int) -> None:
    if not 0 <= click.frame < num_frames:
        raise InputError(f"{where}: frame {click.frame} is not in the video (frames 0 to {num_frames - 1})")
    if not (0 <= click.x < width and 0 <= click.y < height):
        raise InputError(f"{where}: ({click.x:g}, {click.y:g}) is outside the {width}x{height} frame "
                         f"(x from 0 to {width - 1}, y from 0 to {height - 1})")


class VideoSegmenter:
    """SAM2 video propagation (transformers' Sam2VideoModel) for whole videos in memory."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def __call__(self, frames: Iterable[np.ndarray], objects: Sequence[Sequence[Click]], on_frame: FrameCallback | None = None
                 ) -> np.ndarray:
        """Label maps (N, H, W) uint8 of RGB uint8 frames (H, W, 3); `objects` checked by `check_clicks`."""
        processed, height, width = self._processed(frames)
        check_clicks(objects, len(processed), height, width)
        labels = np.zeros((len(processed), height, width), np.uint8)
        groups: dict[int, list[int]] = {}  # first clicked frame -> object ids
        for object_id, clicks in enumerate(objects, start=1):
            groups.setdefault(min(c.frame for c in clicks), []).append(object_id)
        total = sum(len(processed) + (1 if start else 0) for start in groups)
        done = 0
        for start, object_ids in sorted(groups.items()):
            session = self.processor.init_video_session(inference_device=self.device, video_storage_device="cpu", dtype=self.dtype)
            session.video_height, session.video_width = height, width
            for index, pixels in enumerate(processed):
                session.add_new_frame(pixels, index)
            self._add_clicks(session, {i: objects[i - 1] for i in object_ids})
            passes = [self.model.propagate_in_video_iterator(session, start_frame_idx=start)]
            if start:
                passes.append(self.model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=True))
            for propagation in passes:
                for output in propagation:
                    masks = self.processor.post_process_masks([output.pred_masks], original_sizes=[[height, width]], binarize=True)[0]
                    for object_id, mask in zip(output.object_ids, masks[:, 0].cpu().numpy()):
                        frame_labels = labels[output.frame_idx]
                        np.maximum(frame_labels, mask.astype(np.uint8) * object_id, out=frame_labels)
                    done += 1
                    if on_frame is not None:
                        on_frame(done, total)
        return labels

    def _processed(self, frames: Iterable[np.ndarray]) -> tuple[list[torch.Tensor], int, int]:
        """SAM2's input of every frame (resized, normalised, in the model's dtype, on the host), and the frame size."""
        processed, batch, size = [], [], None
        for frame in frames:
            size = size or frame.shape[:2]
            batch.append(frame)
            if len(batch) == PROCESS_FRAMES_PER_CALL:
                processed += self._process(batch)
                batch = []
        if batch:
            processed += self._process(batch)
        if size is None:
            raise InputError("the video has no frames")
        return processed, int(size[0]), int(size[1])

    def _process(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Resized and normalised on the model's device (fast on a GPU), kept on the host."""
        pixels = self.processor.video_processor(videos=[np.stack(frames)], device=self.device, return_tensors="pt").pixel_values_videos[0]
        return list(pixels.to("cpu", self.dtype))

    def _add_clicks(self, session, objects: dict[int, Sequence[Click]]) -> None:
        """Each clicked frame in order: the clicks of every object clicked there, then SAM2's mask on that frame."""
        for frame in sorted({c.frame for clicks in objects.values() for c in clicks}):
            here = {i: [c for c in clicks if c.frame == frame] for i, clicks in objects.items()}
            here = {i: clicks for i, clicks in here.items() if clicks}
            self.processor.add_inputs_to_inference_session(
                inference_session=session,
                frame_idx=frame,
                obj_ids=list(here),
                input_points=[[[[c.x, c.y] for c in clicks] for clicks in here.values()]],
                input_labels=[[[int(c.positive) for c in clicks] for clicks in here.values()]],
            )
            self.model(inference_session=session, frame_idx=frame)


def dilate_labels(labels: np.ndarray, pixels: int) -> np.ndarray:
    """Each object grown by `pixels` (as `dilate_hole`) into the background, never over another object."""
    if pixels <= 0:
        return labels
    grown = labels.copy()
    for object_id in np.unique(labels[labels > 0]):
        for source, target in zip(labels, grown):
            ring = dilate_hole(source == object_id, pixels) & (target == 0)
            target[ring] = object_id
    return grown


def label_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map (index i's bits spread over R, G and B): 1 dark red, 2 green, ..."""
    palette = []
    for index in range(256):
        rgb, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette += rgb
    return palette


def write_label_masks(folder: Path, labels: np.ndarray, names: Sequence[str]) -> None:
    """One palette PNG per frame, `names[i]`.png (no suffix in names)."""
    palette = label_palette()
    for name, frame_labels in zip(names, labels, strict=True):
        image = Image.fromarray(frame_labels)
        image.putpalette(palette)
        image.save(folder / f"{name}.png")
