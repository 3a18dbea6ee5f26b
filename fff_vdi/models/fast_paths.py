"""Exact rewrites of two of the SVD UNet's hot paths, applied in place and opt-in.

Same parameters (names, shapes, state dict), same results up to float rounding; only how the work is
laid out changes. `apply_fast_paths(unet)` before `parallelize_unet`:

- temporal convolutions: SVD's TemporalResnetBlock mixes frames with Conv3d kernels of (3, 1, 1) on
  (B, C, T, h, w). That is a Conv2d with a (3, 1) kernel on the free view (B, C, T, h*w): cuDNN's
  2-D kernels (its most tuned, channels-last under inductor's layout optimisation) instead of 3-D
  ones for a kernel that has no spatial extent.
- single-key cross-attention: every cross-attention of the SVD UNet (spatial and temporal) attends
  to one key, the CLIP image embedding. A softmax over one logit is exactly 1, so the output is
  to_out(to_v(key)) for every query: the query and key projections and the attention kernel are
  skipped (4% of the UNet's training FLOPs, 41.2 -> 39.6 TFLOP per clip at 25x512x256, and the
  attention launches with batch B*h*w). What only feeds the logits (to_q, to_k and, in the temporal
  blocks, the LayerNorm norm2 before the query) then gets no gradient instead of an exactly-zero
  one; AdamW skips those parameters instead of applying weight decay to them, a difference that
  cannot reach the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import TemporalResnetBlock
from torch import nn


class TemporalConv3dAs2d(nn.Conv3d):
    """A Conv3d whose (k, 1, 1) kernels run as a Conv2d over (B, C, T, H*W); other kernels run as Conv3d."""

    def _as_2d(self) -> bool:
        return (
            self.kernel_size[1:] == (1, 1)
            and self.stride[1:] == (1, 1)
            and self.dilation[1:] == (1, 1)
            and tuple(self.padding[1:]) == (0, 0)
            and self.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._as_2d():
            return super().forward(x)
        b, c, t, h, w = x.shape
        out = F.conv2d(
            x.reshape(b, c, t, h * w),
            self.weight.squeeze(-1),
            self.bias,
            stride=(self.stride[0], 1),
            padding=(self.padding[0], 0),
            dilation=(self.dilation[0], 1),
            groups=self.groups,
        )
        return out.view(b, out.shape[1], out.shape[2], h, w)


class SingleKeyCrossAttnProcessor:
    """Cross-attention over a single key token: to_out(to_v(key)) broadcast over the queries.

    Falls back to diffusers' AttnProcessor2_0 for anything else (several keys, a mask, self-attention,
    the normalisations and residual options SVD does not use)."""

    def __init__(self):
        self.fallback = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            encoder_hidden_states is None
            or encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[1] != 1
            or hidden_states.dim() != 3
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.norm_cross is not None
            or attn.residual_connection
        ):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        out = attn.to_out[1](attn.to_out[0](attn.to_v(encoder_hidden_states)))
        out = out / attn.rescale_output_factor
        return out.expand(hidden_states.shape[0], hidden_states.shape[1], out.shape[-1])


def apply_fast_paths(unet: nn.Module, temporal_convs: bool = True, single_key_cross_attention: bool = True) -> dict[str, int]:
    """Install the rewrites in place; returns how many layers each one changed."""
    changed = {"temporal_convs": 0, "single_key_cross_attention": 0}
    for module in unet.modules():
        if temporal_convs and isinstance(module, TemporalResnetBlock):
            for conv in (module.conv1, module.conv2):
                if type(conv) is nn.Conv3d:
                    conv.__class__ = TemporalConv3dAs2d
                    changed["temporal_convs"] += 1
        if single_key_cross_attention and isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(SingleKeyCrossAttnProcessor())
            changed["single_key_cross_attention"] += 1
    return changed


def disconnected_parameters(unet_config: dict) -> set[str]:
    """Names of the parameters that no longer reach the output once the fast paths are installed
    (the query/key projections of the single-key cross-attentions and what only feeds them).

    Found by running a small forward and backward of the model on the meta device (no memory, no
    compute) and keeping the parameters that got no gradient. The trainer freezes them, so that the
    optimizer state covers exactly the parameters that are updated (and resumes from it)."""
    from fff_vdi.models.unet import FFFVDIUNet

    frames, latent = 3, 16
    with torch.device("meta"):
        # diffusers makes a few parameters with torch.Tensor([...]), which ignores the device context.
        unet = FFFVDIUNet.from_config(unet_config).to("meta")
        apply_fast_paths(unet)
        sample = torch.randn(1, frames, unet.config.in_channels, latent, latent)
        masks = torch.zeros(1, frames, 1, 8 * latent, 8 * latent)
        flows = (torch.zeros(1, frames - 1, 2, 8 * latent, 8 * latent),) * 2
        embeds = torch.randn(1, 1, unet.config.cross_attention_dim)
        unet(sample, masks, flows, torch.ones(1), embeds, torch.ones(1, 3)).sum().backward()
    return {name for name, p in unet.named_parameters() if p.grad is None}
