"""Modulated deformable convolution (DCNv2) on torchvision's `deform_conv2d`, made safe to call.

Both the FFF-VDI noise refiner and ProPainter's flow completion align features with a 3x3
modulated deformable convolution. torchvision's CPU kernel does not validate the shapes of the
offsets and modulation masks (a mismatch can crash the process), and neither kernel implements
bfloat16, so every call goes through `modulated_deform_conv2d` below.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d


def check_deform_conv_shapes(
    features: torch.Tensor, offset: torch.Tensor, modulation: torch.Tensor, weight: torch.Tensor, padding: int
) -> None:
    """Raise ValueError unless the shapes form a valid stride-1, dilation-1 deformable convolution.

    Offsets carry 2 * kh * kw * G channels and the modulation kh * kw * G channels, for G deformable
    groups that divide the input channels; their spatial size is the convolution's output size.
    """
    if features.dim() != 4 or offset.dim() != 4 or modulation.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            "deformable convolution needs 4-D features, offset, modulation and weight, got shapes "
            f"{tuple(features.shape)}, {tuple(offset.shape)}, {tuple(modulation.shape)}, {tuple(weight.shape)}"
        )
    n, c, h, w = features.shape
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    if weight.shape[1] != c:
        raise ValueError(f"deformable convolution: weight {tuple(weight.shape)} expects {weight.shape[1]} input channels, features have {c}")
    out_size = (h + 2 * padding - kh + 1, w + 2 * padding - kw + 1)
    if offset.shape[1] % (2 * taps) != 0 or offset.shape[1] == 0:
        raise ValueError(f"deformable convolution: offset has {offset.shape[1]} channels, not a positive multiple of 2*{kh}*{kw}")
    groups = offset.shape[1] // (2 * taps)
    if c % groups != 0:
        raise ValueError(f"deformable convolution: {groups} deformable groups do not divide the {c} input channels")
    expected = {
        "offset": (n, 2 * taps * groups, *out_size),
        "modulation": (n, taps * groups, *out_size),
    }
    for name, tensor in (("offset", offset), ("modulation", modulation)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"deformable convolution: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                f"for features {tuple(features.shape)}, weight {tuple(weight.shape)} and {groups} deformable groups"
            )


def modulated_deform_conv2d(
    features: torch.Tensor,
    offset: torch.Tensor,
    modulation: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
) -> torch.Tensor:
    """Shape-checked `deform_conv2d` (stride 1, dilation 1); offsets are (dy, dx) pairs per tap.

    torchvision has no bfloat16 kernel, so bfloat16 inputs are computed in float32 (as torchvision's
    own autocast rule does) and the result is cast back to the features' dtype.
    """
    check_deform_conv_shapes(features, offset, modulation, weight, padding)
    out_dtype = features.dtype
    compute_dtype = torch.float32 if torch.bfloat16 in (features.dtype, offset.dtype, weight.dtype) else out_dtype
    out = deform_conv2d(
        features.to(compute_dtype),
        offset.to(compute_dtype),
        weight.to(compute_dtype),
        None if bias is None else bias.to(compute_dtype),
        stride=1,
        padding=padding,
        dilation=1,
        mask=modulation.to(compute_dtype),
    )
    return out.to(out_dtype)


class ModulatedDeformConv2d(nn.Module):
    """The weights of a k x k modulated deformable convolution (parameter names `weight`, `bias`).

    Subclasses compute offsets and modulation from their own conditioning and call `deform`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int, deform_groups: int):
        super().__init__()
        if in_channels % deform_groups != 0:
            raise ValueError(f"{deform_groups} deformable groups must divide the {in_channels} input channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.deform_groups = kernel_size, padding, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The published init (mmcv's ModulatedDeformConv2d): uniform(-1/sqrt(fan_in), +1/sqrt(fan_in)),
        # zero bias.
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.zero_()

    def deform(self, features: torch.Tensor, offset: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(features, offset, modulation, self.weight, self.bias, self.padding)


def offset_head(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """Four 3x3 convs with LeakyReLU(0.1) between them; the last one starts at zero.

    Both published alignment modules predict [offset_1, offset_2, modulation] with this head (as
    indices 0, 2, 4, 6 of a Sequential, which the checkpoints' key names rely on); the zero init
    makes the alignment start as a plain flow warp.
    """
    head = nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 3, 1, 1),
        nn.LeakyReLU(negative_slope=0.1),
        nn.Conv2d(hidden_channels, hidden_channels, 3, 1, 1),
        nn.LeakyReLU(negative_slope=0.1),
        nn.Conv2d(hidden_channels, hidden_channels, 3, 1, 1),
        nn.LeakyReLU(negative_slope=0.1),
        nn.Conv2d(hidden_channels, out_channels, 3, 1, 1),
    )
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head
