"""Fit the pipeline's VAE to reconstruct clips: the autoencoder of a pipeline trained from scratch.

A VAE with random weights decodes latents into nothing like the frames they came from, so a model
trained on top of it could not be judged in pixels. When no pretrained VAE can be had (the synthetic
learning run, bench/learning_curve.py), fit one first:

    stats = fit_autoencoder(components.vae, loader, steps=2000, lr=1e-3)

The loss is the one Stable Diffusion's autoencoders start from, without their perceptual and
adversarial terms: mean squared error of the reconstruction decoded from a posterior sample (what
training encodes its targets with) plus `kl_weight` x the KL divergence to N(0, 1). The temporal
decoder decodes each clip's T frames together, as `decode_latents` does. At the end the VAE's
`scaling_factor` is set to 1 / (standard deviation of the latents' means), so that the scaled latents
have unit variance, the convention SVD's 0.18215 follows and the EDM objective assumes.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def fit_autoencoder(vae, batches: Iterator[dict], steps: int, lr: float = 1e-3, kl_weight: float = 1e-6,
                    log_every: int = 100, generator: torch.Generator | None = None) -> dict:
    """Train `vae` in place (float32, on its device) on `steps` batches of a ClipLoader (its
    `pixel_values`, (B, T, 3, H, W) in [-1, 1]); returns the losses and the new scaling factor."""
    device = next(vae.parameters()).device
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses, stds = [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        clips = next(batches)["pixel_values"].to(device, torch.float32)
        num_frames = clips.shape[1]
        frames = clips.flatten(0, 1)
        posterior = vae.encode(frames).latent_dist
        recon = vae.decode(posterior.sample(generator), num_frames=num_frames).sample
        mse = (recon - frames).square().mean()
        loss = mse + kl_weight * posterior.kl().mean() / frames[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(mse.item())
        stds.append(posterior.mean.detach().float().std().item())
        if step % log_every == 0 or step == steps:
            log.info("autoencoder step %d/%d: reconstruction MSE %.5f (%.2f dB), %.1f s", step, steps, mse.item(),
                     10 * torch.log10(4 / mse.detach().clamp_min(1e-12)).item(), time.perf_counter() - start)
    vae.eval().requires_grad_(False)
    recent = stds[-min(len(stds), 50):]
    scaling_factor = 1.0 / (sum(recent) / len(recent))
    vae.register_to_config(scaling_factor=scaling_factor)
    return {"steps": steps, "final_mse": sum(losses[-10:]) / len(losses[-10:]), "scaling_factor": scaling_factor,
            "seconds": time.perf_counter() - start}
