"""Backward warping by optical flow and the forward/backward consistency check.

Flows are (N, 2, H, W) in pixels of the tensor they are applied to, channel 0 = x (width),
channel 1 = y (height). `flow_warp(x, flow)` samples x at p + flow(p) for every pixel p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_warp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear backward warp with zero padding, `align_corners=True` (as published).

    The sampling positions are computed in float32 whatever the dtype of the inputs: in bfloat16 a
    pixel coordinate of 64 has a resolution of 0.5 px, which would blur every warp. The result has
    the features' dtype.
    """
    n, _, h, w = features.shape
    if tuple(flow.shape) != (n, 2, h, w):
        raise ValueError(f"flow_warp: flow has shape {tuple(flow.shape)}, expected {(n, 2, h, w)} for features {tuple(features.shape)}")
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=torch.float32),
        torch.arange(w, device=flow.device, dtype=torch.float32),
        indexing="ij",
    )
    pos_x = xs + flow[:, 0].float()
    pos_y = ys + flow[:, 1].float()
    # Normalise to [-1, 1] the published way (max(size - 1, 1) keeps one-pixel sizes finite).
    grid = torch.stack((2.0 * pos_x / max(w - 1, 1) - 1.0, 2.0 * pos_y / max(h - 1, 1) - 1.0), dim=-1)
    warped = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped.to(features.dtype)


def forward_backward_validity(
    flow_fw: torch.Tensor, flow_bw: torch.Tensor, alpha1: float = 0.01, alpha2: float = 0.5
) -> torch.Tensor:
    """1 where `flow_fw` is confirmed by `flow_bw` warped along it, else 0; shape (N, 1, H, W).

    The published occlusion test (as in UnFlow): |fw + bw(p + fw)|^2 < alpha1 * (|fw|^2 + |bw(p + fw)|^2) + alpha2.
    """
    flow_bw_warped = flow_warp(flow_bw, flow_fw)
    diff_sq = (flow_fw + flow_bw_warped).square().sum(dim=1, keepdim=True)
    mag_sq = flow_fw.square().sum(dim=1, keepdim=True) + flow_bw_warped.square().sum(dim=1, keepdim=True)
    return (diff_sq < alpha1 * mag_sq + alpha2).to(flow_fw.dtype)
