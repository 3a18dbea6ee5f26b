"""ProPainter's recurrent flow completion network, loading `recurrent_flow_completion.pth` strictly.

The flows of a clip are zeroed inside the holes and completed by the network: the forward flows
as they are, the backward flows on the time-reversed sequence. The result keeps the input flow
outside the holes and takes the completion inside. Module names follow ProPainter's
`RecurrentFlowCompleteNet` so that its checkpoint loads unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fff_vdi.errors import InputError, WeightsError
from fff_vdi.models.deform_align import ModulatedDeformConv2d, offset_head
from fff_vdi.models.loading import FLOW_COMPLETION_URL, read_torch_state_dict, strict_load

FLOW_COMPLETION_FILE = "recurrent_flow_completion.pth"


class PseudoConv3d(nn.Module):
    """ProPainter's P3DBlock without its (unused) residual: a 1xkxk spatial conv + LeakyReLU(0.2),
    then a 3x1x1 temporal conv with dilation 2 (output length = input length)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, (1, kernel_size, kernel_size), (1, stride, stride), (0, padding, padding)),
            nn.LeakyReLU(0.2),
        )
        self.conv2 = nn.Sequential(nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UpConv(nn.Module):
    """2x bilinear upsampling (align_corners=True, as published) followed by a conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class SecondOrderDeformAlign(ModulatedDeformConv2d):
    """Align the previous two propagated features [n-1, n-2] (2C channels) to the current frame.

    The offsets are `max_residue * tanh(residual)` (no flow prior here), the modulation a sigmoid;
    the head sees [propagated n-1, current, propagated n-2] (3C channels).
    """

    def __init__(self, channels: int, deform_groups: int = 16, max_residue_magnitude: float = 5.0):
        super().__init__(2 * channels, channels, kernel_size=3, padding=1, deform_groups=deform_groups)
        self.max_residue_magnitude = max_residue_magnitude
        self.conv_offset = offset_head(3 * channels, channels, 27 * deform_groups)

    def forward(self, propagated: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        residual_1, residual_2, modulation = torch.chunk(self.conv_offset(condition), 3, dim=1)
        offset = self.max_residue_magnitude * torch.tanh(torch.cat((residual_1, residual_2), dim=1))
        return self.deform(propagated, offset, torch.sigmoid(modulation))


class SecondOrderPropagation(nn.Module):
    """ProPainter's feature propagation: a backward then a forward second-order recurrent pass,
    fused by a 1x1 conv and added to the input. Features are (B, T, C, h, w)."""

    DIRECTIONS = ("backward_", "forward_")  # the checkpoint's names

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.deform_align = nn.ModuleDict({name: SecondOrderDeformAlign(channels) for name in self.DIRECTIONS})
        # The forward pass also sees the backward pass's output: (2 + i) * C input channels.
        self.backbone = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d((2 + i) * channels, channels, 3, 1, 1),
                    nn.LeakyReLU(negative_slope=0.1),
                    nn.Conv2d(channels, channels, 3, 1, 1),
                )
                for i, name in enumerate(self.DIRECTIONS)
            }
        )
        self.fusion = nn.Conv2d(2 * channels, channels, 1, 1, 0)
        self._compiled_step = None

    def compile_recurrence(self, **compile_kwargs) -> None:
        """torch.compile the recurrent step (one graph per direction, reused for every frame)."""
        self._compiled_step = torch.compile(self.recurrent_step, **{"dynamic": False, **compile_kwargs})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        backward = self._propagate("backward_", x, earlier_pass=None)
        forward = self._propagate("forward_", x, earlier_pass=backward)
        fused = self.fusion(torch.cat([torch.stack(backward, dim=1), torch.stack(forward, dim=1)], dim=2).flatten(0, 1))
        return fused.view(b, t, c, h, w) + x

    def _propagate(self, direction: str, x: torch.Tensor, earlier_pass: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """One pass; returns the propagated features per frame, in frame order."""
        t = x.shape[1]
        frame_order = range(t - 1, -1, -1) if direction == "backward_" else range(t)
        step_fn = self._compiled_step or self.recurrent_step
        produced: list[torch.Tensor] = []  # in processing order
        state = x.new_zeros(x.shape[0], self.channels, *x.shape[-2:])
        for step, frame in enumerate(frame_order):
            current = x[:, frame]
            earlier = earlier_pass[frame] if earlier_pass is not None else None
            if step == 0:
                state = self._refine(direction, state, current, earlier)
            else:
                # Second order: the states of the last two steps (zeros before there are two).
                second = produced[-2] if step > 1 else torch.zeros_like(state)
                state = step_fn(direction, state, second, current, earlier)
            produced.append(state)
        return produced[::-1] if direction == "backward_" else produced

    def recurrent_step(
        self, direction: str, state: torch.Tensor, second: torch.Tensor, current: torch.Tensor, earlier: torch.Tensor | None
    ) -> torch.Tensor:
        """Align the last two states [n-1, n-2] to the current frame, then refine."""
        state = self.deform_align[direction](torch.cat([state, second], dim=1), torch.cat([state, current, second], dim=1))
        return self._refine(direction, state, current, earlier)

    def _refine(self, direction: str, state: torch.Tensor, current: torch.Tensor, earlier: torch.Tensor | None) -> torch.Tensor:
        inputs = [current] + ([earlier] if earlier is not None else []) + [state]
        return state + self.backbone[direction](torch.cat(inputs, dim=1))


class EdgeDetector(nn.Module):
    """ProPainter's flow-edge head. It only serves ProPainter's training loss (never called here),
    but its weights are part of the checkpoint, which we load and save strictly."""

    def __init__(self, in_channels: int = 2, out_channels: int = 1, mid_channels: int = 16):
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, 1, 1), nn.LeakyReLU(0.2))
        self.mid_layer_1 = nn.Sequential(nn.Conv2d(mid_channels, mid_channels, 3, 1, 1), nn.LeakyReLU(0.2))
        self.mid_layer_2 = nn.Sequential(nn.Conv2d(mid_channels, mid_channels, 3, 1, 1))
        self.out_layer = nn.Conv2d(mid_channels, out_channels, 1, 1, 0)


class FlowCompletionNet(nn.Module):
    """ProPainter's RecurrentFlowCompleteNet, for inference.

    Call: `(combined_forward, combined_backward) = net(flows_forward, flows_backward, masks)` with
    flows (B, T-1, 2, H, W) and masks (B, T, 1, H, W), 1 in the hole, H and W multiples of 8.
    """

    def __init__(self):
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv3d(3, 32, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), padding_mode="replicate"),
            nn.LeakyReLU(0.2),
        )
        self.encoder1 = nn.Sequential(PseudoConv3d(32, 32, 3, 1, 1), nn.LeakyReLU(0.2), PseudoConv3d(32, 64, 3, 2, 1), nn.LeakyReLU(0.2))
        self.encoder2 = nn.Sequential(PseudoConv3d(64, 64, 3, 1, 1), nn.LeakyReLU(0.2), PseudoConv3d(64, 128, 3, 2, 1), nn.LeakyReLU(0.2))
        self.mid_dilation = nn.Sequential(
            *[
                layer
                for dilation in (3, 2, 1)
                for layer in (nn.Conv3d(128, 128, (1, 3, 3), padding=(0, dilation, dilation), dilation=(1, dilation, dilation)), nn.LeakyReLU(0.2))
            ]
        )
        self.feat_prop_module = SecondOrderPropagation(128)
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.LeakyReLU(0.2), UpConv(128, 64), nn.LeakyReLU(0.2))
        self.decoder1 = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.LeakyReLU(0.2), UpConv(64, 32), nn.LeakyReLU(0.2))
        self.upsample = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.LeakyReLU(0.2), UpConv(32, 2))
        self.edgeDetector = EdgeDetector()

    def compile_parts(self, **compile_kwargs) -> None:
        """torch.compile the encoder and decoder stages and the propagation's recurrent step, each
        with static shapes: small graphs, where compiling `complete` whole would unroll the
        recurrence over every frame of both directions."""
        kwargs = {"dynamic": False, **compile_kwargs}
        for stage in (self.downsample, self.encoder1, self.encoder2, self.mid_dilation, self.decoder2, self.decoder1, self.upsample):
            stage.compile(**kwargs)
        self.feat_prop_module.compile_recurrence(**kwargs)

    @torch.no_grad()
    def forward(
        self, flows_forward: torch.Tensor, flows_backward: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input flows outside the holes, the completed flows inside."""
        pred_forward, pred_backward = self.complete_bidirectional(flows_forward, flows_backward, masks)
        masks_forward, masks_backward = masks[:, :-1].to(flows_forward.dtype), masks[:, 1:].to(flows_forward.dtype)
        return (
            pred_forward * masks_forward + flows_forward * (1 - masks_forward),
            pred_backward * masks_backward + flows_backward * (1 - masks_backward),
        )

    @torch.no_grad()
    def complete_bidirectional(
        self, flows_forward: torch.Tensor, flows_backward: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's completions of both directions everywhere (inside and outside the holes).

        Forward flow t -> t+1 is masked by frame t's mask, backward flow t+1 -> t by frame t+1's.
        The backward flows are completed as the forward flows of the time-reversed clip. Both
        directions run as one batch (the network treats every clip independently).
        """
        b, t = masks.shape[:2]
        h, w = masks.shape[-2:]
        expected = (b, t - 1, 2, h, w)
        if masks.dim() != 5 or masks.shape[2] != 1 or tuple(flows_forward.shape) != expected or tuple(flows_backward.shape) != expected:
            raise InputError(
                f"flow completion takes flows (B, T-1, 2, H, W) and masks (B, T, 1, H, W); got flows {tuple(flows_forward.shape)}, "
                f"{tuple(flows_backward.shape)} and masks {tuple(masks.shape)}"
            )
        if h % 8 or w % 8:
            raise InputError(f"flow completion needs H and W that are multiples of 8 (it works at 1/8 resolution); got {h}x{w}")
        masks_forward, masks_backward = masks[:, :-1].to(flows_forward.dtype), masks[:, 1:].to(flows_forward.dtype)
        masked = torch.cat([flows_forward * (1 - masks_forward), (flows_backward * (1 - masks_backward)).flip(1)])
        completed = self.complete(masked, torch.cat([masks_forward, masks_backward.flip(1)]))
        return completed[:b], completed[b:].flip(1)

    def complete(self, masked_flows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One direction: flows (B, L, 2, H, W) zeroed in the holes, masks (B, L, 1, H, W) -> completed flows."""
        b, length, _, h, w = masked_flows.shape
        dtype = next(self.parameters()).dtype
        inputs = torch.cat([masked_flows, masks], dim=2).to(dtype).transpose(1, 2)  # (B, 3, L, H, W)
        skip_1 = self.encoder1(self.downsample(inputs))  # (B, 64, L, H/4, W/4)
        bottleneck = self.mid_dilation(self.encoder2(skip_1)).transpose(1, 2)  # (B, L, 128, H/8, W/8)
        features = self.feat_prop_module(bottleneck).flatten(0, 1)
        features = self.decoder2(features) + skip_1.transpose(1, 2).flatten(0, 1)
        flows = self.upsample(self.decoder1(features))
        return flows.view(b, length, 2, h, w).to(masked_flows.dtype)


def find_flow_completion_file(path: str | Path) -> Path:
    path = Path(path)
    return path / FLOW_COMPLETION_FILE if path.is_dir() else path


def load_flow_completion(path: str | Path) -> FlowCompletionNet:
    """ProPainter's recurrent_flow_completion.pth (or a folder holding it), loaded strictly."""
    path = find_flow_completion_file(path)
    state = read_torch_state_dict(path, "flow completion weights", FLOW_COMPLETION_URL)
    model = FlowCompletionNet()
    try:
        strict_load(model, state, "flow completion weights", str(path))
    except WeightsError as e:
        raise WeightsError(f"{e}\nExpected ProPainter's {FLOW_COMPLETION_FILE} ({FLOW_COMPLETION_URL})") from e
    return model.eval()
