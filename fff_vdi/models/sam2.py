"""SAM2 (Segment Anything 2) for video masks, through transformers' `Sam2VideoModel`.

- `load_sam2(source)`: a Hugging Face id (default SAM2.1 hiera-tiny, 39M parameters) or a local folder
  written by `save_pretrained` (config.json, model.safetensors, processor_config.json).
- `build_random_sam2(name)`: the architecture of a released checkpoint ("sam2.1-hiera-tiny",
  "sam2.1-hiera-small") or a tiny one for tests ("tiny"), with random weights, no download.
- `save_sam2(model, processor, out)`: the Hub layout, written into a temporary folder and renamed.

The released architectures follow transformers' conversion script
(models/sam2_video/convert_sam2_video_to_hf.py): hiera-tiny is the configs' defaults, hiera-small
has 11 blocks in its third stage. `tiny` keeps every dimension SAM2's code ties together (memory
channels 64, hidden size a multiple of them, 16x the feature stride of the image size) and shrinks
the rest: a 128-pixel image, a 5-block Hiera of width 16, one memory-attention layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2VideoConfig,
    Sam2VideoMaskDecoderConfig,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoPromptEncoderConfig,
    Sam2VideoVideoProcessor,
    Sam2VisionConfig,
)

from fff_vdi.errors import ConfigError, WeightsError
from fff_vdi.utils.atomic import atomic_folder

DEFAULT_SAM2 = "facebook/sam2.1-hiera-tiny"
TINY_IMAGE_SIZE = 128
ARCHITECTURES = ("tiny", "sam2.1-hiera-tiny", "sam2.1-hiera-small")


def load_sam2(source: str = DEFAULT_SAM2, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
              ) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """The model (eval mode, on `device` in `dtype`) and its processor, from a folder or the Hub."""
    local = Path(source).expanduser()
    if not local.is_dir() and source.count("/") != 1:
        raise WeightsError(f"--sam {source}: neither a folder nor a Hugging Face id (owner/name); e.g. {DEFAULT_SAM2}")
    where = str(local) if local.is_dir() else source
    try:
        processor = Sam2VideoProcessor.from_pretrained(where)
        model = Sam2VideoModel.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        raise WeightsError(_load_failure(source, local.is_dir(), e)) from e
    return model.to(device).eval(), processor


def _load_failure(source: str, is_folder: bool, error: Exception) -> str:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if is_folder:
        return (f"--sam {source}: not a complete SAM2 folder ({detail}); it needs config.json, model.safetensors and "
                f"processor_config.json as written by save_pretrained (or tools/make_tiny_sam2.py)")
    offline = "HF_HUB_OFFLINE=1 is set" if hub_constants.HF_HUB_OFFLINE else "the Hub cannot be reached (or has no such repo)"
    return (f"SAM2 weights '{source}' are not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and {offline}: "
            f"download them once where there is internet with `huggingface-cli download {source}` "
            f"(or `hf download {source}`) and copy the cache here (or set HF_HOME), or pass --sam FOLDER after "
            f"`huggingface-cli download {source} --local-dir FOLDER`")


def sam2_config(name: str) -> Sam2VideoConfig:
    """The architecture `name` (one of ARCHITECTURES)."""
    if name == "sam2.1-hiera-tiny":
        return Sam2VideoConfig()
    if name == "sam2.1-hiera-small":
        backbone = Sam2HieraDetConfig(blocks_per_stage=[1, 2, 11, 2], global_attention_blocks=[7, 10, 13])
        return Sam2VideoConfig(vision_config=Sam2VisionConfig(backbone_config=backbone))
    if name == "tiny":
        size = TINY_IMAGE_SIZE
        backbone = Sam2HieraDetConfig(
            hidden_size=16, image_size=[size, size], embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
            blocks_per_stage=[1, 1, 2, 1], global_attention_blocks=[3], window_size_per_stage=[8, 4, 4, 4],
            window_positional_embedding_background_size=[4, 4],
        )
        # The feature pyramid's three levels at strides 4, 8 and 16 of the image.
        feature_sizes = [[size // stride, size // stride] for stride in (4, 8, 16)]
        vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                                  backbone_feature_sizes=feature_sizes, fpn_hidden_size=128)
        return Sam2VideoConfig(
            vision_config=vision,
            # Config objects, not dicts: Sam2VideoConfig turns a mask decoder dict into a prompt encoder config.
            prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=128, image_size=size, patch_size=16),
            mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
            image_size=size,
            # The memory attention's cross-attention takes 64-channel memories (hard-coded), and the
            # object pointers are split into hidden_size / 64 tokens: hidden 128, memories 64.
            memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
            memory_attention_rope_feat_sizes=feature_sizes[-1], memory_encoder_hidden_size=128, memory_encoder_output_channels=64,
            mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
        )
    raise ConfigError("sam2 architecture", name, f"use one of {', '.join(ARCHITECTURES)}")


def build_random_sam2(name: str = "tiny", *, seed: int = 0, device: torch.device | str = "cpu"
                      ) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """`name`'s architecture with random weights drawn from `seed` (global RNG state left as it was),
    and the processor for its image size."""
    config = sam2_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(config)
    size = {"height": config.image_size, "width": config.image_size}
    processor = Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size=size), video_processor=Sam2VideoVideoProcessor(size=size))
    return model.to(device).eval(), processor


def save_sam2(model: Sam2VideoModel, processor: Sam2VideoProcessor, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model and processor to `out`, all or nothing (`overwrite`: as utils.atomic.atomic_folder)."""
    with atomic_folder(out, "fff_vdi SAM2 save", overwrite) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return Path(out)
