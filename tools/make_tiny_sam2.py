#!/usr/bin/env python
"""Write a SAM2 video model folder with tiny random weights (5 MB, CPU-fast), or a full-size random one.

    python tools/make_tiny_sam2.py OUT [--seed S] [--architecture tiny|sam2.1-hiera-tiny|sam2.1-hiera-small]

OUT gets the Hugging Face layout (config.json, model.safetensors, processor_config.json) and loads
through `fff_vdi.models.sam2.load_sam2` (`python -m fff_vdi.segment --sam OUT`, `python -m fff_vdi.app
--sam OUT`) exactly like downloaded weights. Random weights make arbitrary masks: for tests and demos
of the plumbing, not for real masks.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no installation

from fff_vdi.errors import run_command  # noqa: E402
from fff_vdi.models.sam2 import ARCHITECTURES, build_random_sam2, save_sam2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (absent or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="tiny")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if this tool wrote it (anything else is never replaced)")
    args = parser.parse_args(argv)
    code = run_command(lambda: save_sam2(*build_random_sam2(args.architecture, seed=args.seed), args.out,
                                         overwrite=args.overwrite), writing=args.out)
    if code == 0:
        print(f"random SAM2 ({args.architecture}) written to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
