"""FFF-VDI's noise refiner: flow-guided bidirectional propagation of the UNet's `conv_in` features.

Everything here runs at latent scale: features (B, T, C, h, w), masks (B, T, 1, h, w) with 1 in
the hole, flows (B, T-1, 2, h, w) where `flows_forward[:, t]` maps frame t to t+1 and
`flows_backward[:, t]` maps frame t+1 to t. Module and parameter names follow the published
`BidirectionalPropagation` so that its checkpoints load unchanged (`noise_refiner.deform_align.
backward_1.*`, `noise_refiner.backbone.forward_1.*`, `noise_refiner.fuse.*`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from fff_vdi.models.deform_align import ModulatedDeformConv2d, offset_head
from fff_vdi.models.flow_warp import flow_warp, forward_backward_validity

# The published names of the two passes; the backward pass runs first.
BACKWARD, FORWARD = "backward_1", "forward_1"


class FlowGuidedDeformAlign(ModulatedDeformConv2d):
    """Align the propagated features to the current frame: flow plus a learned residual offset.

    Offsets are `max_residue * tanh(residual) + flow` for every tap of every deformable group,
    the modulation is a sigmoid; the residual head sees [current, flow-warped propagated, flow,
    flow validity, mask] (2C + 4 channels).
    """

    def __init__(self, channels: int, deform_groups: int = 16, max_residue_magnitude: float = 3.0):
        super().__init__(channels, channels, kernel_size=3, padding=1, deform_groups=deform_groups)
        self.max_residue_magnitude = max_residue_magnitude
        taps = self.kernel_size * self.kernel_size
        self.conv_offset = offset_head(2 * channels + 4, channels, 3 * taps * deform_groups)

    def forward(self, propagated: torch.Tensor, condition: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        residual_1, residual_2, modulation = torch.chunk(self.conv_offset(condition), 3, dim=1)
        residual = self.max_residue_magnitude * torch.tanh(torch.cat((residual_1, residual_2), dim=1))
        # deform_conv2d reads offsets as (dy, dx) pairs, the flow is (dx, dy): flip, then repeat it
        # for every tap of every group. The sum takes the flow's (float32) precision when the
        # features are bfloat16: offsets reach tens of pixels.
        offset = residual + flow.flip(1).repeat(1, residual.size(1) // 2, 1, 1)
        return self.deform(propagated, offset, torch.sigmoid(modulation))


def _refine_block(channels: int) -> nn.Sequential:
    """conv(2C+1 -> C), LeakyReLU(0.2), conv(C -> C): the published per-direction backbone and fuse."""
    return nn.Sequential(
        nn.Conv2d(2 * channels + 1, channels, 3, 1, 1),
        nn.LeakyReLU(negative_slope=0.2),
        nn.Conv2d(channels, channels, 3, 1, 1),
    )


class NoiseRefiner(nn.Module):
    """Bidirectional flow-guided propagation with modulated deformable alignment, added to the input.

    A backward pass (last frame to first) propagates features along the forward flows, then a
    forward pass (first to last) propagates the backward pass's output along the backward flows;
    a fuse block combines both passes with the mask and the result is added to the input features.
    """

    def __init__(self, channels: int, deform_groups: int = 16):
        super().__init__()
        if channels % deform_groups != 0:
            raise ValueError(
                f"the noise refiner's {channels} channels (the UNet's block_out_channels[0]) must be divisible "
                f"by its {deform_groups} deformable groups"
            )
        self.channels = channels
        self.deform_align = nn.ModuleDict({name: FlowGuidedDeformAlign(channels, deform_groups) for name in (BACKWARD, FORWARD)})
        self.backbone = nn.ModuleDict({name: _refine_block(channels) for name in (BACKWARD, FORWARD)})
        self.fuse = _refine_block(channels)
        self._compiled_step = None

    def compile_recurrence(self, **compile_kwargs) -> None:
        """torch.compile the recurrent step (warp, align, refine) instead of the unrolled loop: one
        small graph per direction with static shapes, reused for every frame; compiling the whole
        module would trace 2(T-1) copies of it (minutes of compilation at T = 25)."""
        self._compiled_step = torch.compile(self.recurrent_step, **{"dynamic": False, **compile_kwargs})

    def forward(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        flows_forward: torch.Tensor,
        flows_backward: torch.Tensor,
    ) -> torch.Tensor:
        b, t, c, h, w = features.shape
        expected = {"masks": (b, t, 1, h, w), "flows_forward": (b, t - 1, 2, h, w), "flows_backward": (b, t - 1, 2, h, w)}
        for name, tensor in (("masks", masks), ("flows_forward", flows_forward), ("flows_backward", flows_backward)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"noise refiner: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} for features {tuple(features.shape)}")
        masks = masks.to(features.dtype)
        backward = self._propagate(BACKWARD, features, masks, flows_along=flows_forward, flows_against=flows_backward)
        forward = self._propagate(FORWARD, backward, masks, flows_along=flows_backward, flows_against=flows_forward)
        fused = self.fuse(torch.cat([backward.flatten(0, 1), forward.flatten(0, 1), masks.flatten(0, 1)], dim=1))
        return fused.view(b, t, c, h, w) + features

    def _propagate(
        self,
        direction: str,
        features: torch.Tensor,
        masks: torch.Tensor,
        flows_along: torch.Tensor,
        flows_against: torch.Tensor,
    ) -> torch.Tensor:
        """One recurrent pass over time; returns the propagated features in frame order.

        `flows_along[:, k]` carries the state between frames k and k+1 in this pass's direction:
        the backward pass warps frame k+1's state into frame k with the forward flow k -> k+1, the
        forward pass warps frame k's state into frame k+1 with the backward flow k+1 -> k.
        """
        b, t, c, h, w = features.shape
        refine = self.backbone[direction]
        # The validity of each flow depends on the flows only, so it is computed for all frames at once.
        validity = forward_backward_validity(flows_along.flatten(0, 1), flows_against.flatten(0, 1)).view(b, t - 1, 1, h, w)
        frame_order = range(t - 1, -1, -1) if direction == BACKWARD else range(t)
        step_fn = self._compiled_step or self.recurrent_step
        outputs: list[torch.Tensor | None] = [None] * t
        for step, frame in enumerate(frame_order):
            current, mask = features[:, frame], masks[:, frame]
            if step == 0:
                state = current + refine(torch.cat([current, current, mask], dim=1))
            else:
                k = frame if direction == BACKWARD else frame - 1
                state = step_fn(direction, state, current, mask, flows_along[:, k], validity[:, k])
            outputs[frame] = state
        return torch.stack(outputs, dim=1)

    def recurrent_step(
        self, direction: str, state: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, flow: torch.Tensor, validity: torch.Tensor
    ) -> torch.Tensor:
        """The propagated state warped along `flow` into the current frame, aligned, refined."""
        warped = flow_warp(state, flow)
        condition = torch.cat([current, warped, flow.to(current.dtype), validity.to(current.dtype), mask], dim=1)
        state = self.deform_align[direction](state, condition, flow)
        return state + self.backbone[direction](torch.cat([current, state, mask], dim=1))
