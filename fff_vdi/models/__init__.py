"""FFF-VDI's networks: the UNet with its noise refiner, RAFT, flow completion, and their loading.

    unet.py             FFFVDIUNet: SVD's spatio-temporal UNet + noise refiner (refiner.py)
    refiner.py          the flow-guided bidirectional propagation on the conv_in features
    deform_align.py     shape-checked modulated deformable convolution (torchvision)
    flow_warp.py        flow warping and the forward/backward consistency check
    raft.py             torchvision RAFT-large, raft-things.pth key conversion, bidirectional flows
    flow_completion.py  ProPainter's recurrent flow completion network
    encoders.py         VAE encode/decode and CLIP image embedding helpers
    fast_paths.py       opt-in exact rewrites of UNet hot paths (temporal convs as 2-D, single-key cross-attention)
    loading.py          local / Hugging Face weight files and the errors that explain them
    components.py       Components: build_components (from the config), load_components, build_random_components, save_pipeline
    sam2.py             SAM2 video segmentation (transformers): load_sam2, build_random_sam2, save_sam2
    configs/            bundled configs: svd_xt (full size) and tiny (tests, quick start)
"""

from fff_vdi.models.components import Components, build_components, build_random_components, load_components, save_pipeline
from fff_vdi.models.encoders import decode_latents, encode_first_frame, encode_frames, encode_image_embedding
from fff_vdi.models.flow_completion import FlowCompletionNet, load_flow_completion
from fff_vdi.models.raft import RAFTFlow, load_raft
from fff_vdi.models.refiner import NoiseRefiner
from fff_vdi.models.unet import FFFVDIUNet

__all__ = [
    "Components",
    "FFFVDIUNet",
    "FlowCompletionNet",
    "NoiseRefiner",
    "RAFTFlow",
    "build_components",
    "build_random_components",
    "decode_latents",
    "encode_first_frame",
    "encode_frames",
    "encode_image_embedding",
    "load_components",
    "load_flow_completion",
    "load_raft",
    "save_pipeline",
]
