"""The published training objective (docs/FFF-VDI.md, 'One training step'), split in two:

- `FrozenConditioner`: RAFT flows completed in the holes, VAE latents of the clip and of the masked
  clip with noise augmentation, the CLIP embedding of the first frame. Frozen networks, in their own
  dtype (bf16 by default), under inference mode, outside the UNet's FSDP tree. What depends on the
  clean clip alone (`CleanClipFeatures`: RAFT's raw flows, the clip's VAE posterior, the CLIP
  embedding) is computed online unless the batch delivers it precomputed; what depends on the mask
  or on the step's random draws is always computed here.
- `edm_loss`: EDM preconditioning around the UNet with sigma ~ logN(0.7, 1.6), conditioning dropout,
  loss weight (1 + sigma^2) / sigma^2.

All randomness comes from a generator seeded from (seed, rank, step, micro-step): ranks draw
different noise, and a resumed run draws exactly what the uninterrupted run drew. Sigma, timesteps
and time ids stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fff_vdi.config import ObjectiveConfig
from fff_vdi.models.components import Components
from fff_vdi.models.encoders import (
    device_constants,
    encode_first_frame,
    encode_frames,
    latent_moments,
    latents_from_moments,
)


# The config's dtype names (experiment.model.frozen_dtype, experiment.parallel.mixed_precision).
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def step_generator(seed: int, rank: int, step: int, micro_step: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-step of one rank (a pure function of its arguments)."""
    words = (seed & 0xFFFFFFFF, rank, step, micro_step)
    mixed = 0
    for w in words:  # splitmix-style mixing of the words into one 63-bit seed
        mixed = (mixed * 0x9E3779B97F4A7C15 + w + 0x632BE59BD9B4E019) & ((1 << 63) - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def rand_log_normal(shape, mean: float, std: float, gen: torch.Generator, device) -> torch.Tensor:
    """exp(N(mean, std)) in float32."""
    return torch.exp(mean + std * torch.randn(shape, generator=gen, device=device, dtype=torch.float32))


@dataclass
class Conditioning:
    """Everything the UNet step needs from one batch, made by the frozen networks."""

    latents: torch.Tensor  # (B, T, 4, h, w) scaled VAE latents of the clip: the target
    cond_latents: torch.Tensor  # (B, T, 4, h, w) unscaled latents of the noise-augmented masked clip
    cond_sigma: torch.Tensor  # (B,) float32 noise-augmentation level (also a time id)
    image_embeds: torch.Tensor  # (B, 1, D) CLIP embedding of the unmasked first frame
    masks: torch.Tensor  # (B, T, 1, H, W), 1 = hole
    flows_forward: torch.Tensor  # (B, T-1, 2, H, W) float32, completed in the holes
    flows_backward: torch.Tensor


@dataclass
class CleanClipFeatures:
    """What the frozen networks compute from the clean clip alone, the same for every mask and every
    step's draws: what a precomputed conditioning cache can deliver with the batch instead, under the
    batch key `CLEAN_FEATURES` (the conditioner then runs no RAFT, no clean-clip VAE encode, no CLIP)."""

    raw_flows_forward: torch.Tensor  # (B, T-1, 2, H', W') RAFT between neighbouring frames, before completion;
    raw_flows_backward: torch.Tensor  # H' x W' is the clip's size times model.flow_scale
    latent_moments: torch.Tensor  # (B, T, 8, h, w) the clip's VAE posterior (mean, log-variance), unscaled
    image_embeds: torch.Tensor  # (B, 1, D) CLIP embedding of the unmasked first frame


CLEAN_FEATURES = "clean_features"  # the batch key of precomputed CleanClipFeatures


class FrozenConditioner:
    """The frozen networks' part of a step: `conditioner(batch, gen)` -> Conditioning.

    `flow_scale` < 1 (not the published recipe) runs RAFT and flow completion on frames resized by
    that factor, then resizes the flows back and rescales them to full-resolution pixels. Their cost
    falls with the square of the factor; the flows get coarser: RAFT estimates flow on a grid of 1/8
    of its input, i.e. 1/16 of the frame at 0.5, coarser than the UNet's 1/8 latent grid."""

    def __init__(self, components: Components, objective: ObjectiveConfig, raft_iters: int,
                 dtype: torch.dtype, device: torch.device, *, flow_scale: float = 1.0):
        if not 0 < flow_scale <= 1:
            raise ValueError(f"flow_scale must be in (0, 1], got {flow_scale}")
        self.flow_scale = flow_scale
        self.vae = components.vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_encoder = components.image_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = components.feature_extractor
        self.raft = components.raft.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.flow_completion = components.flow_completion.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.objective = objective
        self.raft_iters = raft_iters
        self.dtype = dtype
        self.device = device

    def compile(self, **compile_kwargs) -> None:
        """torch.compile the heavy parts with static shapes (inference graphs): the VAE encoder, RAFT's
        encoders and refinement step, and flow completion's stages."""
        kwargs = {"dynamic": False, **compile_kwargs}
        self.vae.encoder.compile(**kwargs)
        self.raft.raft.feature_encoder.compile(**kwargs)
        self.raft.raft.context_encoder.compile(**kwargs)
        self.raft.compile_iterations(**{k: v for k, v in kwargs.items() if k != "dynamic"})
        self.flow_completion.compile_parts(**{k: v for k, v in kwargs.items() if k != "dynamic"})

    def raw_flows(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RAFT both ways between neighbouring frames, on the unmasked frames (published quirk: the flow
        sees the hole's content), resized by flow_scale first."""
        if self.flow_scale != 1.0:
            b, t, _, h, w = pixels.shape
            size = (round(h * self.flow_scale), round(w * self.flow_scale))
            pixels = F.interpolate(pixels.flatten(0, 1).float(), size=size, mode="bilinear", align_corners=False,
                                   antialias=True).unflatten(0, (b, t))
        return self.raft.bidirectional(pixels, iters=self.raft_iters)

    def complete_flows(self, raw_forward: torch.Tensor, raw_backward: torch.Tensor,
                       masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow completion inside the holes, at RAFT's resolution; flows from downscaled frames come
        back at the clip's size, in its pixels."""
        if self.flow_scale == 1.0:
            return self.flow_completion(raw_forward.float(), raw_backward.float(), masks.float())
        b, t, _, h, w = masks.shape
        size = tuple(raw_forward.shape[-2:])
        holes = F.adaptive_max_pool2d(masks.flatten(0, 1).float(), size)  # a pixel touching the hole stays in it
        completed = self.flow_completion(raw_forward.float(), raw_backward.float(), holes.unflatten(0, (b, t)))
        to_pixels = device_constants([w / size[1], h / size[0]], completed[0]).view(1, 2, 1, 1)  # (x, y) factors
        return tuple(
            (F.interpolate(flow.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False) * to_pixels).unflatten(0, (b, t - 1))
            for flow in completed
        )

    def flows(self, pixels: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RAFT on the unmasked frames, then flow completion inside the holes."""
        return self.complete_flows(*self.raw_flows(pixels), masks)

    @torch.inference_mode()
    def clean_features(self, pixels: torch.Tensor) -> CleanClipFeatures:
        """The mask-independent part, online."""
        raw_forward, raw_backward = self.raw_flows(pixels)
        return CleanClipFeatures(raw_forward, raw_backward, latent_moments(self.vae, pixels),
                                 encode_first_frame(self.image_encoder, self.feature_extractor, pixels))

    @torch.inference_mode()
    def _compute(self, pixels: torch.Tensor, masks: torch.Tensor, clean: CleanClipFeatures,
                 gen: torch.Generator) -> Conditioning:
        b = pixels.shape[0]
        flows_forward, flows_backward = self.complete_flows(clean.raw_flows_forward, clean.raw_flows_backward, masks)
        latents = latents_from_moments(self.vae, clean.latent_moments.to(self.dtype), sample=True, scaled=True, generator=gen)
        cond_sigma = rand_log_normal((b,), self.objective.cond_p_mean, self.objective.cond_p_std, gen, self.device)
        masked = pixels * (1 - masks)
        noise = torch.randn(masked.shape, generator=gen, device=self.device, dtype=torch.float32)
        noisy_masked = masked.float() + cond_sigma.view(b, 1, 1, 1, 1) * noise
        cond_latents = encode_frames(self.vae, noisy_masked, sample=True, scaled=False, generator=gen)
        return Conditioning(latents, cond_latents, cond_sigma, clean.image_embeds.to(self.dtype), masks, flows_forward,
                            flows_backward)

    def __call__(self, batch: dict, gen: torch.Generator) -> Conditioning:
        """`batch`: pixel_values (B, T, 3, H, W) in [-1, 1], mask_values (B, T, 1, H, W), and optionally
        CLEAN_FEATURES. The draws from `gen` are the same either way."""
        pixels, masks = batch["pixel_values"], batch["mask_values"]
        clean = batch.get(CLEAN_FEATURES)
        if clean is None:
            clean = self.clean_features(pixels)
        out = self._compute(pixels, masks, clean, gen)
        # Inference-mode tensors cannot enter autograd: hand the UNet ordinary copies.
        return Conditioning(*(t.clone() for t in (out.latents, out.cond_latents, out.cond_sigma, out.image_embeds,
                                                   out.masks, out.flows_forward, out.flows_backward)))


def added_time_ids(objective: ObjectiveConfig, cond_sigma: torch.Tensor) -> torch.Tensor:
    """(B, 3) float32: fps, motion bucket, noise-augmentation level.

    The constants are filled on the device: a tensor built from a list on the CPU and copied to the
    GPU would wait for all queued GPU work (a synchronisation between conditioning and the UNet)."""
    b = cond_sigma.shape[0]
    f32 = dict(dtype=torch.float32, device=cond_sigma.device)
    fps = torch.full((b, 1), float(objective.fps), **f32)
    motion_bucket = torch.full((b, 1), float(objective.motion_bucket_id), **f32)
    return torch.cat([fps, motion_bucket, cond_sigma.float().view(b, 1)], dim=1)


def conditioning_dropout(u: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published dropout from one uniform draw u per sample: u < 2p drops the image embedding,
    p <= u < 3p drops the condition latents (so [0, p): embedding, [p, 2p): both, [2p, 3p): latents).
    Returns keep-multipliers (B,) for the embedding and the latents."""
    keep_embedding = (u >= 2 * p).float()
    keep_latents = 1 - ((u >= p) & (u < 3 * p)).float()
    return keep_embedding, keep_latents


def edm_loss(unet, cond: Conditioning, objective: ObjectiveConfig, gen: torch.Generator,
             compute_dtype: torch.dtype) -> torch.Tensor:
    latents = cond.latents.float()
    b = latents.shape[0]
    device = latents.device
    sigma = rand_log_normal((b,), objective.p_mean, objective.p_std, gen, device)
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=torch.float32)
    u = torch.rand((b,), generator=gen, device=device, dtype=torch.float32)
    s = sigma.view(b, 1, 1, 1, 1)
    noisy = latents + s * noise
    keep_embedding, keep_latents = conditioning_dropout(u, objective.cond_dropout)
    image_embeds = cond.image_embeds * keep_embedding.view(b, 1, 1).to(cond.image_embeds.dtype)
    cond_latents = cond.cond_latents.float() * keep_latents.view(b, 1, 1, 1, 1)
    sample = torch.cat([noisy / torch.sqrt(s**2 + 1), cond_latents], dim=2).to(compute_dtype)
    model_out = unet(
        sample,
        cond.masks,
        (cond.flows_forward, cond.flows_backward),
        0.25 * torch.log(sigma),
        image_embeds.to(compute_dtype),
        added_time_ids(objective, cond.cond_sigma),
    )
    denoised = model_out.float() * (-s / torch.sqrt(s**2 + 1)) + noisy / (s**2 + 1)
    weight = (1 + s**2) / s**2
    return torch.mean(weight * (denoised - latents) ** 2)
