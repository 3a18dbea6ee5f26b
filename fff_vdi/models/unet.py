"""The FFF-VDI UNet: Stable Video Diffusion's spatio-temporal UNet with the noise refiner after `conv_in`.

`FFFVDIUNet` subclasses diffusers' `UNetSpatioTemporalConditionModel` and reuses all its blocks;
only the forward pass is written out, because the refiner sits between `conv_in` and the first
down block. Parameter names equal the published model's, so an FFF-VDI `unet/` loads strictly, and
a Stable Video Diffusion `unet/` (no `noise_refiner.*` keys) loads with the refiner at its
published initialisation.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel

from fff_vdi.errors import WeightsError
from fff_vdi.models.loading import WeightsRoot, describe_key_mismatch, is_half, key_mismatch, read_safetensors, weight_file_candidates
from fff_vdi.models.refiner import NoiseRefiner

logger = logging.getLogger(__name__)

REFINER_PREFIX = "noise_refiner."
# Config class names we accept: SVD's (and the published FFF-VDI code's, which reuses the name) and ours.
UNET_CLASS_NAMES = ("UNetSpatioTemporalConditionModel", "FFFVDIUNet")


def _broadcast_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Tile x along the batch to `batch` rows (classifier-free guidance concatenates [uncond, cond])."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0] != 0:
        raise ValueError(f"{name} has batch {x.shape[0]}, which does not divide the sample's batch {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


def _resize_frames(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x.flatten(0, 1), size=size, mode=mode, **kwargs).unflatten(0, x.shape[:2])


class FFFVDIUNet(UNetSpatioTemporalConditionModel):
    """SVD's UNet (in: 4 noisy + 4 condition latent channels) with a flow-guided noise refiner.

    forward(sample (B,T,8,h,w), masks (B,T,1,H,W), (flows_forward, flows_backward) each
    (B,T-1,2,H,W) in pixels of H x W, timestep, encoder_hidden_states (B,1,D), added_time_ids (B,3))
    returns the model output (B,T,4,h,w). Masks and flows may have a batch that divides B (they
    are tiled, as under classifier-free guidance).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_refiner = NoiseRefiner(self.config.block_out_channels[0])

    # diffusers reads the config keys from the signature of __init__: expose the parent's.
    __init__.__signature__ = inspect.signature(UNetSpatioTemporalConditionModel.__init__)

    def forward(
        self,
        sample: torch.Tensor,
        masks: torch.Tensor,
        flows: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor],
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
    ) -> torch.Tensor:
        batch, num_frames = sample.shape[:2]
        emb = self.conditioning_embedding(timestep, added_time_ids, batch, sample.dtype, sample.device)
        masks, flows_forward, flows_backward = self.guidance_at_latent_scale(masks, flows, batch, sample.shape[-2:])

        features = self.conv_in(sample.flatten(0, 1)).unflatten(0, (batch, num_frames))
        features = self.noise_refiner(features, masks, flows_forward, flows_backward)

        out = self.denoise_features(
            features.flatten(0, 1),
            emb.repeat_interleave(num_frames, dim=0, output_size=batch * num_frames),
            encoder_hidden_states.repeat_interleave(num_frames, dim=0, output_size=batch * num_frames),
            batch,
            num_frames,
        )
        return out.unflatten(0, (batch, num_frames))

    def conditioning_embedding(
        self, timestep: torch.Tensor | float, added_time_ids: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Time embedding plus the embedding of the added time ids (fps, motion bucket, noise augmentation)."""
        timesteps = torch.as_tensor(timestep, device=device).float().reshape(-1).expand(batch)
        # The sinusoidal projections compute in float32 (pass timesteps and time ids in float32: a
        # bfloat16 timestep has 3 significant digits); the embedding MLPs run in the model's dtype.
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
        return emb + self.add_embedding(time_embeds)

    @staticmethod
    def guidance_at_latent_scale(
        masks: torch.Tensor, flows: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor], batch: int, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks (nearest) and completed flows (bilinear, align_corners=False) resized to the latent size.

        Published quirk, kept: the flows are not rescaled in magnitude. The published code divides
        them by (flow height / latent height) *after* resizing, i.e. by 1, so the refiner sees flow
        vectors in full-resolution pixels at latent scale (8x too long); its weights are trained so.
        """
        flows_forward, flows_backward = flows
        masks = _resize_frames(_broadcast_batch(masks, batch, "masks"), size, "nearest")
        flows_forward = _resize_frames(_broadcast_batch(flows_forward, batch, "flows_forward"), size, "bilinear")
        flows_backward = _resize_frames(_broadcast_batch(flows_backward, batch, "flows_backward"), size, "bilinear")
        return masks, flows_forward, flows_backward

    def denoise_features(
        self, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, batch: int, num_frames: int
    ) -> torch.Tensor:
        """diffusers' UNet from the first down block to `conv_out`, on (B*T, C, h, w) features."""
        # Latent sizes that are not multiples of 2**num_upsamplers (e.g. 432x240 video) need the
        # up blocks to be told the size of their skip connections (the published code cannot run them).
        forward_upsample_size = any(s % 2**self.num_upsamplers != 0 for s in sample.shape[-2:])
        image_only_indicator = torch.zeros(batch, num_frames, dtype=sample.dtype, device=sample.device)

        skips = (sample,)
        for block in self.down_blocks:
            kwargs = {"encoder_hidden_states": encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}
            sample, block_skips = block(hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator, **kwargs)
            skips += block_skips

        sample = self.mid_block(
            hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states, image_only_indicator=image_only_indicator
        )

        for i, block in enumerate(self.up_blocks):
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            kwargs = {"encoder_hidden_states": encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=block_skips,
                upsample_size=upsample_size,
                image_only_indicator=image_only_indicator,
                **kwargs,
            )

        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "FFFVDIUNet":
        """Load an FFF-VDI or SVD `unet/` (config.json + diffusion_pytorch_model[.fp16].safetensors).

        `source` is the unet folder itself, or a pipeline folder / Hub repo with `subfolder="unet"`.
        A checkpoint without any `noise_refiner.*` key (SVD's) gets the refiner's published
        initialisation, which is logged; any other missing or unexpected key is a WeightsError.
        """
        root = WeightsRoot(source, revision)
        config_path = root.find(subfolder, ["config.json"], "UNet config")
        weights_path = root.find(subfolder, weight_file_candidates("diffusion_pytorch_model", is_half(torch_dtype)), "UNet weights")
        config = json.loads(config_path.read_text())
        if config.get("_class_name") not in UNET_CLASS_NAMES:
            raise WeightsError(f"{config_path} describes a {config.get('_class_name')!r}, expected one of {UNET_CLASS_NAMES}")
        state_dict = read_safetensors(weights_path, "UNet weights")
        return cls.from_state_dict(config, state_dict, str(weights_path), torch_dtype=torch_dtype, device=device)

    @classmethod
    def from_state_dict(
        cls,
        config: dict,
        state_dict: dict[str, torch.Tensor],
        where: str,
        *,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "FFFVDIUNet":
        """Build the model on the meta device and take the tensors of `state_dict` (see from_pretrained)."""
        with torch.device("meta"):
            model = cls.from_config(config)
        expected = model.state_dict()
        refiner_keys = {k for k in expected if k.startswith(REFINER_PREFIX)}
        missing, unexpected, mismatched = key_mismatch(expected, state_dict)
        fresh_refiner = bool(refiner_keys) and set(missing) == refiner_keys  # no refiner key at all, nothing else missing
        if unexpected or mismatched or (missing and not fresh_refiner):
            raise WeightsError(describe_key_mismatch("UNet weights", where, missing, unexpected, mismatched))
        if fresh_refiner:
            # A Stable Video Diffusion UNet: the refiner starts from its published initialisation
            # (PyTorch's default conv init, deformable conv weights uniform(+-1/sqrt(fan_in)) with
            # zero bias, offset heads' last conv zero), drawn from torch's global RNG.
            model.noise_refiner = NoiseRefiner(config["block_out_channels"][0])
            logger.warning(
                "UNet weights at %s have no noise_refiner.* parameters (a Stable Video Diffusion UNet): "
                "the noise refiner (%d tensors) was freshly initialised as published; train it before use.",
                where,
                len(refiner_keys),
            )
        model.load_state_dict(state_dict, strict=not fresh_refiner, assign=True)
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (about float32-only modules we do not have).
        return torch.nn.Module.to(model, device=device, dtype=torch_dtype or torch.float32).eval()
