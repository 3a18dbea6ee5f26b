"""The frozen encoders' calls that training and inference share: VAE encode/decode, CLIP embedding.

Pixels are in [-1, 1]; frames are (B, T, 3, H, W), latents (B, T, 4, H/8, W/8). Everything stays
in torch on the tensors' device (the CLIP preprocessing is reimplemented from the processor's
config instead of calling the processor, which would go through numpy on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_moments(vae, frames_btchw: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(B, T, 2C, h, w): the VAE posterior's parameters (mean, then log-variance, on channels) of every
    frame, `chunk` frames per encoder call, in the VAE's dtype. What `latents_from_moments` samples."""
    b, t = frames_btchw.shape[:2]
    dtype = next(vae.parameters()).dtype
    frames = frames_btchw.flatten(0, 1).to(dtype)
    moments = [vae.encode(frames[start : start + chunk]).latent_dist.parameters for start in range(0, frames.shape[0], chunk)]
    return torch.cat(moments).unflatten(0, (b, t))


def latents_from_moments(
    vae,
    moments_btchw: torch.Tensor,
    *,
    sample: bool,
    scaled: bool,
    chunk: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents (B, T, C, h, w) from `latent_moments`: sample=True draws from the posterior (training),
    False takes its mode (inference condition); scaled=True multiplies by the VAE's scaling factor
    (0.18215 for SVD). The published training scales the target latents but not the condition latents.
    The draws are made per `chunk` frames, as diffusers' posterior of each encoder call makes them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    b, t = moments_btchw.shape[:2]
    moments = moments_btchw.flatten(0, 1)
    latents = []
    for start in range(0, moments.shape[0], chunk):
        posterior = DiagonalGaussianDistribution(moments[start : start + chunk])
        latents.append(posterior.sample(generator) if sample else posterior.mode())
    latents = torch.cat(latents)
    if scaled:
        latents = latents * vae.config.scaling_factor
    return latents.unflatten(0, (b, t))


def encode_frames(
    vae,
    frames_btchw: torch.Tensor,
    *,
    sample: bool,
    scaled: bool,
    chunk: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VAE latents of every frame (`latent_moments`, then `latents_from_moments`)."""
    return latents_from_moments(vae, latent_moments(vae, frames_btchw, chunk), sample=sample, scaled=scaled,
                                chunk=chunk, generator=generator)


def decode_latents(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Frames (B, T, 3, H, W) in float32 (about [-1, 1], not clamped) from scaled latents (B, T, 4, h, w).

    The temporal decoder treats each call's frames as one clip, so chunks never cross clips
    (the published pipeline chunks the flattened batch, which can mix two clips in one call).
    """
    dtype = next(vae.parameters()).dtype
    clips = []
    for clip in latents:
        clip = (clip / vae.config.scaling_factor).to(dtype)
        parts = [vae.decode(clip[s : s + chunk], num_frames=clip[s : s + chunk].shape[0]).sample for s in range(0, clip.shape[0], chunk)]
        clips.append(torch.cat(parts))
    return torch.stack(clips).float()


def resize_with_antialiasing(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Gaussian blur then bicubic resize (align_corners=True): the published `_resize_with_antialiasing`.

    The blur's sigma per axis is max((factor - 1) / 2, 0.001) for the downscaling factor, its kernel
    2 * 2 * sigma wide (at least 3, made odd), applied separably with reflect padding (after
    scikit-image / kornia, as in diffusers' SVD pipeline).
    """
    h, w = images.shape[-2:]
    sigmas = (max((h / size[0] - 1.0) / 2.0, 0.001), max((w / size[1] - 1.0) / 2.0, 0.001))
    kernel_sizes = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
    kernel_sizes = [k + 1 if k % 2 == 0 else k for k in kernel_sizes]
    blurred = _blur_along(images, _gaussian_kernel(kernel_sizes[1], sigmas[1], images), dim=-1)
    blurred = _blur_along(blurred, _gaussian_kernel(kernel_sizes[0], sigmas[0], images), dim=-2)
    return F.interpolate(blurred, size=size, mode="bicubic", align_corners=True)


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    kernel = torch.exp(-x.pow(2.0) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur_along(images: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise 1-D convolution of (N, C, H, W) images along H (dim=-2) or W (dim=-1), reflect-padded."""
    c, k = images.shape[1], kernel.numel()
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
    if dim == -1:
        padded, weight = F.pad(images, (*pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, k)
    else:
        padded, weight = F.pad(images, (0, 0, *pad), mode="reflect"), kernel.view(1, 1, k, 1)
    return F.conv2d(padded, weight.expand(c, 1, *weight.shape[-2:]), groups=c)


def device_constants(values, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of Python numbers in `like`'s dtype on its device, made by fills on the device.

    `torch.tensor(values, device="cuda")` builds the tensor on the CPU and copies it over, and that
    copy waits until the GPU has finished all queued work: a full synchronisation in the middle of a
    training step."""
    return torch.stack([torch.full((), float(v), dtype=like.dtype, device=like.device) for v in values])


def clip_input_size(feature_extractor) -> tuple[int, int]:
    """(height, width) that the CLIP image encoder takes: the processor's crop size (224 for SVD)."""
    crop = feature_extractor.crop_size
    return int(crop["height"]), int(crop["width"])


def encode_image_embedding(image_encoder, feature_extractor, images_bchw: torch.Tensor) -> torch.Tensor:
    """CLIP `image_embeds` (B, 1, D) of images (B, 3, H, W) in [-1, 1], the published way.

    Resize in [-1, 1] with antialiasing to the processor's size, map to [0, 1], normalise with the
    processor's CLIP mean/std, encode; the output has the encoder's dtype.
    """
    images = resize_with_antialiasing(images_bchw.float(), clip_input_size(feature_extractor))
    images = (images + 1.0) / 2.0
    mean = device_constants(feature_extractor.image_mean, images).view(1, -1, 1, 1)
    std = device_constants(feature_extractor.image_std, images).view(1, -1, 1, 1)
    images = (images - mean) / std
    dtype = next(image_encoder.parameters()).dtype
    return image_encoder(pixel_values=images.to(dtype)).image_embeds.unsqueeze(1)


def encode_first_frame(image_encoder, feature_extractor, frames_btchw: torch.Tensor) -> torch.Tensor:
    """CLIP embedding (B, 1, D) of each clip's first frame (the published image condition)."""
    return encode_image_embedding(image_encoder, feature_extractor, frames_btchw[:, 0])
