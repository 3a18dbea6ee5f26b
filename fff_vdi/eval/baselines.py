"""A classical video fill to measure learned inpainting against, from the same visible pixels.

`temporal_median_fill`: every hole pixel takes the median of the values that pixel shows in the
frames where it is visible; pixels hidden in every frame are interpolated from their surroundings
(`harmonic_fill`: the solution of Laplace's equation with the known pixels as boundary values, the
smoothest surface through them). It needs no weights and no flow: under a moving hole it recovers
a static background exactly; under motion it fills with a blend of what passed through the pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Conjugate gradients on the unknown pixels: exact for a system of n unknowns after n iterations in
# exact arithmetic, in practice within a relative residual of RESIDUAL_TOLERANCE after a few times the
# hole's diameter; checked every CHECK_EVERY iterations (each check waits for the device).
RESIDUAL_TOLERANCE = 1e-6
CHECK_EVERY = 16


def temporal_median_fill(frames_tchw: torch.Tensor, masks_t1hw: torch.Tensor) -> torch.Tensor:
    """The clip (T, C, H, W) with its holes (masks 1 = hole) filled; outside the holes the input."""
    holes = masks_t1hw > 0.5
    visible_values = frames_tchw.float().masked_fill(holes, float("nan"))
    median = torch.nanmedian(visible_values, dim=0).values  # (C, H, W), NaN where never visible
    filled = torch.where(holes, median.expand_as(frames_tchw), frames_tchw.float())
    never_visible = holes.all(dim=0, keepdim=True).expand_as(holes)
    return harmonic_fill(filled, never_visible).to(frames_tchw.dtype)


def _laplacian(u: torch.Tensor) -> torch.Tensor:
    """The grid graph's Laplacian (4-neighbourhood; at the image border the missing neighbours are
    left out, i.e. no flow across the border), symmetric positive semi-definite."""
    padded = F.pad(u, (1, 1, 1, 1), mode="replicate")
    return 4 * u - padded[..., :-2, 1:-1] - padded[..., 2:, 1:-1] - padded[..., 1:-1, :-2] - padded[..., 1:-1, 2:]


def harmonic_fill(images_nchw: torch.Tensor, unknown_n1hw: torch.Tensor) -> torch.Tensor:
    """Images with their unknown pixels replaced by the solution of Laplace's equation whose boundary
    values are the known pixels (conjugate gradients per image and channel, started from the mean of
    the known pixels). An image without any known pixel is filled with 0."""
    if not bool(unknown_n1hw.any()):
        return images_nchw
    inside = unknown_n1hw.expand_as(images_nchw).float()
    known = torch.nan_to_num(images_nchw.float()) * (1 - inside)  # unknown values (NaN included) never leak
    count = (1 - inside).sum(dim=(-2, -1), keepdim=True)
    x = inside * known.sum(dim=(-2, -1), keepdim=True) / count.clamp_min(1)
    b = -inside * _laplacian(known)
    r = b - inside * _laplacian(x)
    p = r
    rs = r.square().sum(dim=(-2, -1), keepdim=True)
    stop = RESIDUAL_TOLERANCE**2 * b.square().sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    for iteration in range(inside.shape[-2] * inside.shape[-1]):
        ap = inside * _laplacian(p)
        alpha = rs / (p * ap).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_next = r.square().sum(dim=(-2, -1), keepdim=True)
        if iteration % CHECK_EVERY == 0 and bool((rs_next <= stop).all()):
            break
        p = r + rs_next / rs.clamp_min(1e-30) * p
        rs = rs_next
    return known + inside * x
