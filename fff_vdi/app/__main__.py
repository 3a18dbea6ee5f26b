"""A web page to remove objects from videos: upload, click on the object, make its mask with SAM2,
inpaint with FFF-VDI, download the video and its frames.

    python -m fff_vdi.app --model PIPELINE [--sam facebook/sam2.1-hiera-tiny | FOLDER] [--port 7860]
        [--host 127.0.0.1] [--max-frames 300] [--workdir DIR] [inpainting options of python -m fff_vdi.inpaint]

PIPELINE: a pipeline folder (e.g. the quick start's quickstart_out/runs/tiny_cpu/pipeline) or a
Hugging Face id. --sam: SAM2 weights, a Hugging Face id (downloaded into the Hugging Face cache on
first use) or a folder (tools/make_tiny_sam2.py writes a random one, for trying the plumbing
offline). Both load once, at start-up. The inpainting options (--steps, --height/--width, --window,
--device, --offload, ...) are those of `python -m fff_vdi.inpaint`; the page lets each user change
the steps, the seed and the mask's growth. Jobs run one at a time in arrival order (Gradio's queue);
their files live under --workdir (a new temporary folder by default) until the tab closes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# Before Gradio is imported: no usage statistics sent (and no waiting on a network that may be absent).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fff_vdi.errors import FFFVDIError  # noqa: E402
from fff_vdi.inference.segmentation import VideoSegmenter  # noqa: E402
from fff_vdi.inpaint import add_inference_options, inference_device, inference_dtype  # noqa: E402
from fff_vdi.models import load_components  # noqa: E402
from fff_vdi.models.sam2 import DEFAULT_SAM2, load_sam2  # noqa: E402

EXAMPLE = Path(__file__).parent / "assets" / "example.webm"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fff_vdi.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="inpainting pipeline: folder (our layout) or Hugging Face id")
    p.add_argument("--raft", help="RAFT weights when --model has no raft/ (a Hugging Face SVD id)")
    p.add_argument("--flow-completion", help="recurrent_flow_completion.pth when --model has no flow_completion/")
    p.add_argument("--sam", default=DEFAULT_SAM2, help=f"SAM2 weights: Hugging Face id or folder (default {DEFAULT_SAM2})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-frames", type=int, default=300, help="longest video accepted (frames are held in memory)")
    p.add_argument("--workdir", type=Path, help="where jobs write their files (default: a new temporary folder)")
    add_inference_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        demo, workdir = build(args)
    except FFFVDIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"jobs write into {workdir}", file=sys.stderr)
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                   allowed_paths=[str(workdir), str(EXAMPLE.parent)], max_file_size="1gb")
    return 0


def build(args: argparse.Namespace):
    """Load both models (on the host for inpainting: each job's memory plan places them) and make the page."""
    from fff_vdi.app.session import Models  # Gradio's import is slow: only once the arguments are known good
    from fff_vdi.app.ui import build_demo

    device = inference_device(args.device)
    dtype = inference_dtype(device, args.dtype)
    model, processor = load_sam2(args.sam, device=device, dtype=dtype)
    components = load_components(args.model, raft=args.raft, flow_completion=args.flow_completion, torch_dtype=dtype)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fff_vdi_app_"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = Models(VideoSegmenter(model, processor), components, args, args.max_frames)
    return build_demo(models, workdir.resolve(), EXAMPLE), workdir.resolve()


if __name__ == "__main__":
    sys.exit(main())
