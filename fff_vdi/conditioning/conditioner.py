"""The conditioning of a training step from a precomputed cache: only what depends on the mask runs.

`CachedConditioner.condition(batch, gen)` gives the `Conditioning` that `FrozenConditioner` would
compute for the same batch and generator: the clean latents are sampled from the cached posterior
parameters with the same generator calls as `encode_frames(..., sample=True)` (so every later draw
is the same too), the cached RAFT flows are completed in the batch's holes by the flow completion
network, the masked clip is noise-augmented and encoded online, and the cached CLIP embedding of
each clip's first frame is used as is. RAFT and the CLIP encoder are not run (nor moved to the device).
"""

from __future__ import annotations

import logging

import torch

from fff_vdi.conditioning.compute import network_fingerprints
from fff_vdi.conditioning.reader import CachedFrames, ConditioningCache
from fff_vdi.config import ExperimentConfig
from fff_vdi.models.components import Components
from fff_vdi.models.encoders import latents_from_moments
from fff_vdi.train.objective import DTYPES, Conditioning, for_autograd, noise_augmented_condition

log = logging.getLogger(__name__)


class CachedConditioner:
    def __init__(self, components: Components, cfg: ExperimentConfig, device: torch.device):
        dtype = DTYPES[cfg.model.frozen_dtype]
        self.vae = components.vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.flow_completion = components.flow_completion.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.objective = cfg.objective
        self.device = device

    @classmethod
    def for_training(cls, cache: ConditioningCache, components: Components, cfg: ExperimentConfig,
                     device: torch.device) -> "CachedConditioner":
        """After checking that the frozen networks are those the cache was made with."""
        m = cfg.model
        weights = ("experiment.model.random_init", m.random_init) if m.random_init else ("experiment.model.pretrained", m.pretrained)
        raft = ("experiment.model.raft", m.raft) if m.raft and not m.random_init else weights
        cache.check_networks(network_fingerprints(components, DTYPES[m.frozen_dtype]),
                             {"vae_encoder": weights, "image_encoder": weights, "clip_preprocessing": weights, "raft": raft})
        log.info("conditioning from the cache %s: RAFT flows, clean latent distributions, CLIP embeddings",
                 cache.root)
        return cls(components, cfg, device)

    def compile(self, **compile_kwargs) -> None:
        """torch.compile what still runs per step: the VAE encoder and flow completion's stages."""
        self.vae.encoder.compile(**{"dynamic": False, **compile_kwargs})
        self.flow_completion.compile_parts(**compile_kwargs)

    @torch.inference_mode()
    def _compute(self, pixels: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, cached: CachedFrames) -> Conditioning:
        flows_forward, flows_backward = self.flow_completion(cached.flows_forward.float(), cached.flows_backward.float(),
                                                             masks.float())
        latents = latents_from_moments(cached.moments, self.vae.config.scaling_factor, sample=True, generator=gen)
        cond_sigma, cond_latents = noise_augmented_condition(self.vae, self.objective, pixels, masks, gen)
        return Conditioning(latents, cond_latents, cond_sigma, cached.image_embeds, masks, flows_forward, flows_backward)

    def condition(self, batch: dict, gen: torch.Generator) -> Conditioning:
        return for_autograd(self._compute(batch["pixel_values"], batch["mask_values"], gen, batch["conditioning"]))
