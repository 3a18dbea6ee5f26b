"""Synthetic videos in the YouTube-VOS layout, for tests, benchmarks and the quick start.

Each video is a textured background (smooth noise, stripes and fine grain) panning at a constant
velocity, with two to four textured ellipses and rectangles moving over it at their own constant
velocities, so optical flow between frames is meaningful and known. One or two of the shapes are
annotated objects (palette PNG, ids 1 and 2; the others are unlabelled distractors that occlude).

Layout written under `root`:

    JPEGImages/<video>/<frame>.jpg    baseline JPEG, 4:2:0
    Annotations/<video>/<frame>.png   palette PNG of object ids (with_annotations=True)

Video ids are `synth0000`, `synth0001`, ... Frame names are five-digit numbers: consecutive
(`00000`, `00001`, ...) with `fps_layout="youtube_vos"`, or in steps of 5 (`00000`, `00005`, ...)
like the 6 fps YouTube-VOS release with `fps_layout="youtube_vos_6fps"`. Everything is a pure
function of (seed, video number), so a set is reproducible file by file.

    python -m fff_vdi.data.synthetic --out DIR --videos N --frames T --height H --width W
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fff_vdi.errors import InputError
from fff_vdi.utils.parallel import map_in_order

FRAME_NAME_STEP = {"youtube_vos": 1, "youtube_vos_6fps": 5}
# DAVIS / YouTube-VOS palette colours of background, object 1 and object 2.
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0]


def write_synthetic_videos(
    root: str | Path,
    num_videos: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int = 0,
    with_annotations: bool = True,
    fps_layout: str = "youtube_vos",
    quality: int = 90,
    workers: int = 1,
) -> Path:
    """Write `num_videos` videos of `num_frames` frames of `height` x `width`; returns `root`. Each video
    depends only on (seed, its index), so `workers` processes give the same files as one."""
    if fps_layout not in FRAME_NAME_STEP:
        raise InputError(f"fps_layout={fps_layout!r} is unknown; use one of {sorted(FRAME_NAME_STEP)}")
    if min(num_videos, num_frames, height, width, workers) < 1:
        raise InputError(f"num_videos, num_frames, height, width and workers must be >= 1, got "
                         f"{num_videos}, {num_frames}, {height}, {width}, {workers}")
    root = Path(root)
    write = functools.partial(_write_video, root, num_frames=num_frames, height=height, width=width, seed=seed,
                              with_annotations=with_annotations, step=FRAME_NAME_STEP[fps_layout], quality=quality)
    for _ in map_in_order(write, range(num_videos), workers):
        pass
    return root


def _write_video(root: Path, v: int, num_frames: int, height: int, width: int, seed: int, with_annotations: bool,
                 step: int, quality: int) -> None:
    video_id = f"synth{v:04d}"
    scene = Scene.random(np.random.default_rng([seed, v]), num_frames, height, width)
    frame_dir = root / "JPEGImages" / video_id
    mask_dir = root / "Annotations" / video_id
    frame_dir.mkdir(parents=True, exist_ok=True)
    if with_annotations:
        mask_dir.mkdir(parents=True, exist_ok=True)
    for t in range(num_frames):
        rgb, labels = scene.render(t)
        stem = f"{t * step:05d}"
        Image.fromarray(rgb).save(frame_dir / f"{stem}.jpg", quality=quality)
        if with_annotations:
            mask = Image.fromarray(labels, mode="P")
            mask.putpalette(PALETTE)
            mask.save(mask_dir / f"{stem}.png")


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: smooth colour noise + oriented stripes + fine grain."""
    cell = max(8, min(height, width) // 6)
    coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = 25 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    grain = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    # Muted colours (about 128 +- 75) leave room for stripes and grain before clipping.
    return np.clip(128 + 0.6 * (smooth - 128) + stripes[..., None] + grain, 0, 255).astype(np.uint8)


def random_velocity(rng: np.random.Generator, max_speed: float) -> tuple[float, float]:
    """(dy, dx) px per frame in a random direction, at least half of max_speed so nothing stands still
    (positions are rounded to whole pixels)."""
    speed, angle = rng.uniform(max_speed / 2, max_speed), rng.uniform(0, 2 * np.pi)
    return float(speed * np.sin(angle)), float(speed * np.cos(angle))


@dataclass
class Shape:
    pixels: np.ndarray  # (h, w, 3) uint8 texture
    inside: np.ndarray  # (h, w) bool: which pixels of the box belong to the shape
    position: tuple[float, float]  # (y, x) of the box's top-left corner at frame 0
    velocity: tuple[float, float]  # px per frame
    label: int  # object id in the annotation, 0 for a distractor


@dataclass
class Scene:
    background: np.ndarray  # (H + pan span, W + pan span, 3): the frame is a moving crop of it
    background_start: tuple[int, int]
    background_velocity: tuple[float, float]
    shapes: list[Shape]
    height: int
    width: int

    @classmethod
    def random(cls, rng: np.random.Generator, num_frames: int, height: int, width: int) -> "Scene":
        max_speed = max(2.0, width / 160)  # px per frame: visible motion at any resolution
        velocity = random_velocity(rng, max_speed)
        span = [int(np.ceil(abs(v) * (num_frames - 1))) + 1 for v in velocity]
        background = texture(rng, height + span[0], width + span[1])
        # A negative velocity starts from the far end of the canvas so the crop stays inside it.
        start = tuple(s - 1 if v < 0 else 0 for s, v in zip(span, velocity))
        num_objects = int(rng.integers(1, 3))
        shapes = [cls._random_shape(rng, height, width, max_speed, label=k + 1 if k < num_objects else 0)
                  for k in range(int(rng.integers(2, 5)))]
        return cls(background, start, velocity, shapes, height, width)

    @staticmethod
    def _random_shape(rng, height, width, max_speed, label) -> Shape:
        h = max(2, int(height * rng.uniform(0.15, 0.35)))
        w = max(2, int(width * rng.uniform(0.15, 0.35)))
        if rng.random() < 0.5:
            inside = np.ones((h, w), dtype=bool)
        else:
            y, x = np.mgrid[0:h, 0:w]
            inside = ((y + 0.5) / h * 2 - 1) ** 2 + ((x + 0.5) / w * 2 - 1) ** 2 <= 1
        position = (rng.uniform(-h / 2, height - h / 2), rng.uniform(-w / 2, width - w / 2))
        return Shape(texture(rng, h, w), inside, position, random_velocity(rng, max_speed), label)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t: (H, W, 3) uint8 RGB and (H, W) uint8 object ids."""
        oy, ox = (round(s + v * t) for s, v in zip(self.background_start, self.background_velocity))
        rgb = self.background[oy:oy + self.height, ox:ox + self.width].copy()
        labels = np.zeros((self.height, self.width), dtype=np.uint8)
        for shape in self.shapes:
            top, left = (round(p + v * t) for p, v in zip(shape.position, shape.velocity))
            h, w = shape.inside.shape
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + h, self.height), min(left + w, self.width)
            if y0 >= y1 or x0 >= x1:
                continue  # moved out of view
            inside = shape.inside[y0 - top:y1 - top, x0 - left:x1 - left]
            rgb[y0:y1, x0:x1][inside] = shape.pixels[y0 - top:y1 - top, x0 - left:x1 - left][inside]
            labels[y0:y1, x0:x1][inside] = shape.label
        return rgb, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write JPEGImages/ and Annotations/ into")
    parser.add_argument("--videos", type=int, required=True, help="number of videos")
    parser.add_argument("--frames", type=int, required=True, help="frames per video")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps-layout", choices=sorted(FRAME_NAME_STEP), default="youtube_vos",
                        help="frame numbering: consecutive (youtube_vos) or steps of 5 (youtube_vos_6fps)")
    parser.add_argument("--no-annotations", action="store_true", help="write no Annotations/ folder")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering videos (same files for any)")
    args = parser.parse_args(argv)
    root = write_synthetic_videos(args.out, args.videos, args.frames, args.height, args.width, seed=args.seed,
                                  with_annotations=not args.no_annotations, fps_layout=args.fps_layout,
                                  workers=args.workers)
    print(f"wrote {args.videos} videos of {args.frames} frames ({args.width}x{args.height}) to {root}")


if __name__ == "__main__":
    main()
