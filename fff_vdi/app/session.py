"""What the web app does, without the web page: read an upload, keep the clicks, make the masks,
inpaint, package the results. ui.py only wires these to Gradio components.

One `Session` per browser tab holds its video (frames in memory), its clicks and its masks. Jobs
write into their own folder, WORKDIR/<session>/job-<n>/:

    masks/00000.png ...        the label masks (as `python -m fff_vdi.segment` writes them)
    masks.webm                 the masks over the video (preview)
    result/                    what `python -m fff_vdi.inpaint` writes (frames/, inpainted.mp4, comparison.mp4)
    frames.zip, masks.zip      the downloads besides result/inpainted.mp4
    input_mask_result.webm     input | masks | result (preview)
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fff_vdi.app.media import draw_clicks, overlay_labels, write_preview, zip_files
from fff_vdi.errors import InputError
from fff_vdi.inference.segmentation import Click, VideoSegmenter, check_click_position, dilate_labels, write_label_masks
from fff_vdi.inference.video_io import open_video, read_rgb
from fff_vdi.inpaint import DEFAULT_FPS, inpaint
from fff_vdi.models import Components

Progress = Callable[[float, str], None]  # (fraction done, what is running)


@dataclass
class Models:
    """What every job shares, loaded once at start-up: SAM2, the inpainting networks, and the
    inpainting options the app was started with (`python -m fff_vdi.app --help`)."""

    segmenter: VideoSegmenter
    components: Components
    inference: argparse.Namespace
    max_frames: int


@dataclass
class Video:
    path: Path
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: float

    @property
    def num_frames(self) -> int:
        return len(self.frames)


@dataclass
class Session:
    workdir: Path  # this tab's folder: WORKDIR/<session>
    video: Video | None = None
    clicks: list[tuple[int, Click]] = field(default_factory=list)  # (object id, click)
    labels: np.ndarray | None = None  # (N, H, W) uint8 masks of the current clicks, dilated
    jobs: int = 0

    def load(self, path: str | Path | None, max_frames: int) -> Video:
        """The uploaded video, read whole; forgets the previous one's clicks and masks."""
        if path is None:
            raise InputError("no video: upload one (mp4, webm, mov, avi, mkv) or pick the example")
        source = open_video(path)
        if len(source) > max_frames:
            raise InputError(f"{Path(path).name} has {len(source)} frames; this app takes at most {max_frames} "
                             f"(start it with a larger --max-frames, or cut the video)")
        if len(source) < 2:
            raise InputError(f"{Path(path).name} has {len(source)} frame: inpainting needs at least 2 (flows link neighbouring frames)")
        self.video = Video(Path(path), np.stack(list(source.frames())), source.fps or DEFAULT_FPS)
        self.clicks, self.labels = [], None
        return self.video

    def forget_video(self) -> None:
        self.video, self.clicks, self.labels = None, [], None

    def require_video(self) -> Video:
        if self.video is None:
            raise InputError("no video yet: upload one or pick the example first")
        return self.video

    def add_click(self, x: float, y: float, frame: int, object_id: int, positive: bool) -> None:
        """A click on the frame shown; the masks must be made again."""
        video = self.require_video()
        click = Click(float(x), float(y), positive, int(frame))
        check_click_position(click, f"the click at ({click.x:g}, {click.y:g})", video.num_frames, *video.frames.shape[1:3])
        self.clicks.append((int(object_id), click))
        self.labels = None

    def clear_clicks(self) -> None:
        self.clicks, self.labels = [], None

    def objects(self) -> list[list[Click]]:
        """Clicks per object, objects in the order of their ids (they become masks 1, 2, ...)."""
        by_id: dict[int, list[Click]] = {}
        for object_id, click in sorted(self.clicks, key=lambda c: c[0]):
            by_id.setdefault(object_id, []).append(click)
        return list(by_id.values())

    def frame_view(self, index: int) -> np.ndarray:
        """Frame `index` with its masks (if made) and the clicks on it."""
        video = self.require_video()
        index = int(np.clip(index, 0, video.num_frames - 1))
        frame = video.frames[index]
        if self.labels is not None:
            frame = overlay_labels(frame, self.labels[index])
        return draw_clicks(frame, [(i, c) for i, c in self.clicks if c.frame == index])

    def describe_clicks(self) -> str:
        if not self.clicks:
            return "No clicks yet: click on the object in the frame (pick the frame with the slider)."
        lines = [f"object {i}: {'+' if c.positive else '-'} ({c.x:.0f}, {c.y:.0f}) on frame {c.frame}" for i, c in self.clicks]
        return f"{len(self.clicks)} click(s): " + "; ".join(lines)

    def segment(self, models: Models, dilation: int, progress: Progress) -> Path:
        """Masks of the current clicks for every frame (grown by `dilation` pixels); returns the preview."""
        video = self.require_video()
        if dilation < 0:
            raise InputError(f"mask dilation {dilation}: use 0 or more pixels")

        def on_frame(done: int, total: int) -> None:
            progress(done / total, f"SAM2: {done}/{total} frames")

        labels = models.segmenter(video.frames, self.objects(), on_frame)
        self.labels = dilate_labels(labels, dilation)
        job = self.new_job()
        return write_preview(job / "masks.webm", ([overlay_labels(f, l)] for f, l in zip(video.frames, self.labels)), video.fps)

    def inpaint(self, models: Models, steps: int, seed: int, progress: Progress) -> "Results":
        video = self.require_video()
        if self.labels is None:
            raise InputError("no masks for these clicks yet: make the mask first (button 3)")
        if not self.labels.any():
            raise InputError("the masks are empty on every frame: click on the object again and make the mask")
        job = self.workdir / f"job-{self.jobs}"
        (job / "masks").mkdir(exist_ok=True)
        names = [f"{i:05d}" for i in range(video.num_frames)]
        write_label_masks(job / "masks", self.labels, names)
        args = argparse.Namespace(**{
            **vars(models.inference), "video": str(video.path), "video_id": None, "masks": str(job / "masks"),
            "out": str(job / "result"), "overwrite": True, "steps": int(steps), "seed": int(seed),
            "mask_dilation": 0,  # the masks are dilated already, as the page shows them
        })

        def on_step(window: int, windows: int, done: int, total: int) -> None:
            progress((window + done / total) / windows, f"inpainting: window {window + 1}/{windows}, step {done}/{total}")

        progress(0.0, "inpainting: flows and conditioning")
        result = inpaint(args, components=models.components, progress=on_step)
        progress(1.0, "writing the downloads")
        frames = sorted((result / "frames").glob("*.png"))
        output = np.stack([read_rgb(f) for f in frames])
        preview = write_preview(job / "input_mask_result.webm",
                                ([f, overlay_labels(f, l), o] for f, l, o in zip(video.frames, self.labels, output)), video.fps)
        return Results(result / "inpainted.mp4", zip_files(job / "frames.zip", frames),
                       zip_files(job / "masks.zip", sorted((job / "masks").glob("*.png"))), preview)

    def new_job(self) -> Path:
        """A fresh job folder (the previous one of this tab is deleted: its files were served already)."""
        shutil.rmtree(self.workdir / f"job-{self.jobs}", ignore_errors=True)
        self.jobs += 1
        job = self.workdir / f"job-{self.jobs}"
        job.mkdir(parents=True)
        return job


@dataclass
class Results:
    mp4: Path
    frames_zip: Path
    masks_zip: Path
    preview: Path

    @property
    def downloads(self) -> list[str]:
        return [str(self.mp4), str(self.frames_zip), str(self.masks_zip)]
