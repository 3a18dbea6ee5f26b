#!/usr/bin/env python
"""Write a complete FFF-VDI pipeline folder with tiny random networks (tens of MB, CPU-fast).

    python tools/make_tiny_pipeline.py OUT [--seed S] [--overwrite]

OUT gets the real layout (model_index.json, unet/, vae/, image_encoder/, feature_extractor/,
scheduler/, raft/raft-things.pth, flow_completion/recurrent_flow_completion.pth) and loads
through `fff_vdi.models.load_components` exactly like a real pipeline. The configs are
fff_vdi/models/configs/tiny/ (RAFT and flow completion keep their fixed full architectures).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no installation

from fff_vdi.errors import run_command  # noqa: E402
from fff_vdi.utils.atomic import PIPELINE_WRITER, check_output_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (absent or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if a pipeline export wrote it (anything else is never replaced)")
    args = parser.parse_args(argv)
    def write() -> None:
        check_output_folder(args.out, PIPELINE_WRITER, args.overwrite)  # before the networks' libraries load
        from fff_vdi.models import build_random_components, save_pipeline

        save_pipeline(build_random_components("tiny", seed=args.seed), args.out, overwrite=args.overwrite)

    code = run_command(write, writing=args.out)
    if code == 0:
        print(f"tiny pipeline written to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
