#!/usr/bin/env python
"""Write the web app's example video, fff_vdi/app/assets/example.webm: 8 frames of 320x180 at 12 fps,
textured shapes moving over a panning textured background (fff_vdi.data.synthetic, seed 7).

    python tools/make_app_example.py [OUT]

Small (about 100 KB) so that it can ship in the package; VP8 WebM so that browsers play it.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no installation

from fff_vdi.app.__main__ import EXAMPLE  # noqa: E402
from fff_vdi.app.media import PREVIEW_CODEC  # noqa: E402
from fff_vdi.data.synthetic import Scene  # noqa: E402
from fff_vdi.inference.video_io import write_mp4  # noqa: E402

SEED, NUM_FRAMES, HEIGHT, WIDTH, FPS = 7, 8, 180, 320, 12


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=EXAMPLE, help=f"the file to write (default {EXAMPLE})")
    args = parser.parse_args(argv)
    scene = Scene.random(np.random.default_rng([SEED, 0]), NUM_FRAMES, HEIGHT, WIDTH)
    write_mp4(args.out, (scene.render(t)[0] for t in range(NUM_FRAMES)), FPS, codec=PREVIEW_CODEC)
    print(f"example video written to {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
