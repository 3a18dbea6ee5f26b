#!/usr/bin/env python
"""Write a complete FFF-VDI pipeline folder with tiny random networks (tens of MB, CPU-fast).

    python tools/make_tiny_pipeline.py OUT [--seed S]

OUT gets the real layout (model_index.json, unet/, vae/, image_encoder/, feature_extractor/,
scheduler/, raft/raft-things.pth, flow_completion/recurrent_flow_completion.pth) and loads
through `fff_vdi.models.load_components` exactly like a real pipeline. The configs are
fff_vdi/models/configs/tiny/ (RAFT and flow completion keep their fixed full architectures).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no installation

from fff_vdi.models import build_random_components, save_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    out = save_pipeline(build_random_components("tiny", seed=args.seed), args.out)
    print(f"tiny pipeline written to {out}")


if __name__ == "__main__":
    main()
