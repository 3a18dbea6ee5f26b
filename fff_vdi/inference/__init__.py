"""Inference: the published FFF-VDI sampler and videos of any length.

    sampler.py   InpaintSampler: one clip through the published sampling (also the trainer's validation)
    windows.py   overlapping windows, each continuing the previous one, cross-faded: any video length
    memory.py    the GPU memory plan: offload, feed-forward chunking, VAE chunk for a memory budget
    video_io.py  frames / videos / masks on disk, resizing, compositing, PNG and mp4 output
    segmentation.py  masks from clicks: SAM2 propagation through a video, label PNGs
The command lines are `python -m fff_vdi.inpaint` (fff_vdi/inpaint.py) and `python -m fff_vdi.segment`.
"""

from fff_vdi.inference.sampler import InpaintSampler
from fff_vdi.inference.windows import Window, WindowedInpainter, crossfade_weights, default_overlap, plan_windows

__all__ = ["InpaintSampler", "Window", "WindowedInpainter", "crossfade_weights", "default_overlap", "plan_windows"]
