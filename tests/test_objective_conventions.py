"""The conventions that training (fff_vdi/train/objective.py) and sampling (fff_vdi/inference/sampler.py)
must share, each pinned directly (tests/test_learning.py checks the trained chain end to end).

- Preconditioning: a UNet that outputs exactly the v-prediction which SVD's EulerDiscreteScheduler
  turns into a known clean latent (diffusers: x0 = v * -sigma / sqrt(sigma^2 + 1) + x / (sigma^2 + 1),
  input scaled by 1 / sqrt(sigma^2 + 1), timestep 0.25 log sigma) has zero training loss, and the
  sampler driven by it returns that latent, decoded.
- Conditioning dropout as published: the CLIP embedding dropped for 2p of the samples, the
  condition latents for 2p, both for p.
- Noise augmentation: the condition latents carry the noise of the drawn level.
"""

from __future__ import annotations

import math

import pytest
import torch

from fff_vdi.config import ObjectiveConfig
from fff_vdi.inference.sampler import InpaintSampler
from fff_vdi.models import build_random_components
from fff_vdi.models.encoders import decode_latents, encode_frames
from fff_vdi.train.objective import Conditioning, FrozenConditioner, conditioning_dropout, edm_loss

H = W = 128


class OracleUNet(torch.nn.Module):
    """Returns the v-prediction that SVD's scheduler reads as `target` (B, T, 4, h, w), whatever the conditions."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target

    def forward(self, sample, masks, flows, timestep, image_embeds, time_ids):
        sigma = torch.exp(4 * timestep.float()).reshape(-1, 1, 1, 1, 1)  # the scheduler's timestep is 0.25 log sigma
        noisy = sample[:, :, :4].float() * torch.sqrt(sigma**2 + 1)  # undo the input scaling
        target = self.target.repeat(sample.shape[0] // self.target.shape[0], 1, 1, 1, 1)
        return (target - noisy / (sigma**2 + 1)) / (-sigma / torch.sqrt(sigma**2 + 1))


@pytest.fixture(scope="module")
def components():
    components = build_random_components("tiny", seed=0)
    with torch.no_grad():  # a sharp posterior, as SVD's (training samples it)
        components.vae.quant_conv.weight[4:] = 0
        components.vae.quant_conv.bias[4:] = -14.0
    return components


def conditioning(target: torch.Tensor, num_embeddings: int = 32) -> Conditioning:
    b, t, _, h, w = target.shape
    g = torch.Generator().manual_seed(1)
    return Conditioning(latents=target, cond_latents=torch.randn(target.shape, generator=g),
                        cond_sigma=torch.full((b,), 0.02), image_embeds=torch.randn(b, 1, num_embeddings, generator=g),
                        masks=torch.zeros(b, t, 1, 8 * h, 8 * w), flows_forward=torch.zeros(b, t - 1, 2, 8 * h, 8 * w),
                        flows_backward=torch.zeros(b, t - 1, 2, 8 * h, 8 * w))


def test_the_ideal_denoiser_of_the_scheduler_has_zero_training_loss():
    target = torch.randn(64, 2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    loss = edm_loss(OracleUNet(target), conditioning(target), ObjectiveConfig(), torch.Generator().manual_seed(2), torch.float32)
    assert loss.item() < 1e-6, f"the training objective reads the UNet's output otherwise than the sampler's scheduler (loss {loss.item():.3g})"


def test_the_sampler_driven_by_the_ideal_denoiser_returns_its_latents(components):
    target = torch.randn(1, 3, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    frames = torch.rand(1, 3, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    masks = torch.zeros(1, 3, 1, H, W)
    masks[..., 32:96, 40:100] = 1
    sampler = InpaintSampler(components, unet=OracleUNet(target), num_steps=4, raft_iters=1)
    out = sampler(frames, masks, torch.Generator().manual_seed(3))
    expected = decode_latents(components.vae, target).clamp(-1, 1)  # latents in the scaled space, as trained
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()


def test_conditioning_dropout_drops_as_published():
    p = ObjectiveConfig().cond_dropout
    u = (torch.arange(100_000) + 0.5) / 100_000
    keep_embedding, keep_latents = conditioning_dropout(u, p)
    assert (1 - keep_embedding).mean().item() == pytest.approx(2 * p, abs=1e-4)
    assert (1 - keep_latents).mean().item() == pytest.approx(2 * p, abs=1e-4)
    assert ((1 - keep_embedding) * (1 - keep_latents)).mean().item() == pytest.approx(p, abs=1e-4)

    class Recorder(torch.nn.Module):  # what the UNet is given
        def forward(self, sample, masks, flows, timestep, image_embeds, time_ids):
            self.embeds, self.cond_latents = image_embeds, sample[:, :, 4:]
            return torch.zeros_like(sample[:, :, :4])

    target = torch.randn(2000, 2, 4, 1, 1)
    cond = conditioning(target)
    unet = Recorder()
    edm_loss(unet, cond, ObjectiveConfig(), torch.Generator().manual_seed(4), torch.float32)
    dropped_embedding = (unet.embeds.abs().sum(dim=(1, 2)) == 0).float()
    dropped_latents = (unet.cond_latents.abs().sum(dim=(1, 2, 3, 4)) == 0).float()
    assert dropped_embedding.mean().item() == pytest.approx(2 * p, abs=0.04)  # 2000 draws: 4.5 standard deviations
    assert dropped_latents.mean().item() == pytest.approx(2 * p, abs=0.04)
    assert (dropped_embedding * dropped_latents).mean().item() == pytest.approx(p, abs=0.03)


def test_condition_latents_carry_the_drawn_noise_augmentation(components):
    frames = torch.rand(1, 2, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.zeros(1, 2, 1, H, W)
    masks[..., 40:80, 40:80] = 1
    clean = encode_frames(components.vae, frames * (1 - masks), sample=False, scaled=False)

    def condition(log_sigma: float):
        objective = ObjectiveConfig(cond_p_mean=log_sigma, cond_p_std=1e-3)
        conditioner = FrozenConditioner(components, objective, 1, torch.float32, torch.device("cpu"))
        cond = conditioner({"pixel_values": frames, "mask_values": masks}, torch.Generator().manual_seed(5))
        assert cond.cond_sigma.item() == pytest.approx(math.exp(log_sigma), rel=0.01)
        return (cond.cond_latents - clean).abs().mean().item()

    noisy, quiet = condition(0.0), condition(-12.0)  # sigma 1 and 6e-6 (in pixels, [-1, 1])
    assert quiet < 1e-3 and noisy > 100 * quiet, (noisy, quiet)
