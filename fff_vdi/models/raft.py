"""Optical flow with torchvision's RAFT-large, loadable from the original `raft-things.pth`.

The published code uses a copy of the original RAFT; torchvision's `raft_large` is the same network
under other parameter names, so we convert the checkpoint's keys instead of copying code. Images
are in [-1, 1] and are not rescaled: the published copy has RAFT's /255 normalisation commented
out and receives [-1, 1] pixels, which is also what torchvision's RAFT expects.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models.optical_flow import raft_large
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow

from fff_vdi.errors import InputError, WeightsError
from fff_vdi.models.loading import RAFT_URL, describe_key_mismatch, read_torch_state_dict, strict_load

RAFT_FILE_NAMES = ("raft-things.pth",)
RAFT_MIN_SIZE = 128  # four correlation pyramid levels below the 1/8-resolution features

# torchvision name -> original name, as (pattern, replacement) applied in order to the torchvision key.
_TORCHVISION_TO_ORIGINAL = [
    (r"^feature_encoder\.", "fnet."),
    (r"^context_encoder\.", "cnet."),
    (r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1."),
    (r"^cnet\.convnormrelu\.1\.", "cnet.norm1."),
    (r"\.convnormrelu([12])\.0\.", r".conv\1."),
    (r"\.convnormrelu([12])\.1\.", r".norm\1."),
    (r"^(fnet|cnet)\.conv\.", r"\1.conv2."),
    (r"^update_block\.motion_encoder\.convcorr([12])\.0\.", r"update_block.encoder.convc\1."),
    (r"^update_block\.motion_encoder\.convflow([12])\.0\.", r"update_block.encoder.convf\1."),
    (r"^update_block\.motion_encoder\.conv\.0\.", "update_block.encoder.conv."),
    (r"^update_block\.recurrent_block\.convgru([12])\.conv([zrq])\.", r"update_block.gru.conv\2\1."),
    (r"^mask_predictor\.convrelu\.0\.", "update_block.mask.0."),
    (r"^mask_predictor\.conv\.", "update_block.mask.2."),
]
# In the original checkpoint a strided residual block's `norm3` is also registered as
# `downsample.1`: the same tensors appear under both names.
_NORM3_ALIAS = re.compile(r"^(cnet\.layer\d\.\d)\.downsample\.1\.(.+)$")


def original_raft_name(torchvision_name: str) -> str:
    name = torchvision_name
    for pattern, replacement in _TORCHVISION_TO_ORIGINAL:
        name = re.sub(pattern, replacement, name)
    return name


def to_original_layout(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision RAFT-large state dict -> the `raft-things.pth` layout (`module.` prefix, norm3 aliases)."""
    out = {}
    for key, value in torchvision_state.items():
        name = original_raft_name(key)
        out["module." + name] = value
        alias = _NORM3_ALIAS.match(name)
        if alias:
            out[f"module.{alias.group(1)}.norm3.{alias.group(2)}"] = value
    return out


def to_torchvision_layout(original_state: dict[str, torch.Tensor], torchvision_keys: list[str], where: str) -> dict[str, torch.Tensor]:
    """The `raft-things.pth` layout (with or without `module.`) -> torchvision's names, strictly."""
    state = {k.removeprefix("module."): v for k, v in original_state.items()}
    names = {original_raft_name(k): k for k in torchvision_keys}
    aliases = {f"{m.group(1)}.norm3.{m.group(2)}" for m in map(_NORM3_ALIAS.match, names) if m}
    missing = [n for n in names if n not in state]
    unexpected = [k for k in state if k not in names and k not in aliases]
    if missing or unexpected:
        raise WeightsError(describe_key_mismatch("RAFT weights (raft-things.pth layout)", where, missing, unexpected))
    return {names[k]: v for k, v in state.items() if k in names}


def check_raft_size(height: int, width: int) -> None:
    if height < RAFT_MIN_SIZE or width < RAFT_MIN_SIZE or height % 8 or width % 8:
        raise InputError(
            f"RAFT needs frames of at least {RAFT_MIN_SIZE}x{RAFT_MIN_SIZE} pixels with sides that are multiples of 8 "
            f"(its correlation pyramid has four levels below 1/8 resolution); got {height}x{width} (HxW): resize or pad the video"
        )


def _bilinear_lookup(volume: torch.Tensor, pixel_coords: torch.Tensor) -> torch.Tensor:
    """torchvision's RAFT `grid_sample` (pixel coordinates, align_corners=True, zero padding), on the
    native kernel: the batch here is one lookup per pixel of every pair (N*h*w), which cuDNN's grid
    sampler refuses past about 100k rows (48 pairs at 1024x576, or 2 clips at 512x256), and which
    F.grid_sample would send to cuDNN."""
    h, w = volume.shape[-2:]
    x, y = pixel_coords.split([1, 1], dim=-1)
    grid = torch.cat([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1 if h > 1 else y], dim=-1)
    return torch.grid_sampler_2d(volume, grid.to(volume.dtype), 0, 0, True)  # bilinear, zeros, align_corners


def index_correlation_pyramid(pyramid: list[torch.Tensor], centroids_coords: torch.Tensor, radius: int) -> torch.Tensor:
    """torchvision's `CorrBlock.index_pyramid` on an explicit pyramid, with its lookup offsets made
    on the coordinates' device: torchvision builds them on the CPU and copies them over at every
    iteration, and that copy waits for the GPU to finish all queued work (a full sync per iteration).

    Returns the correlation features (N, levels * (2r+1)^2, h, w) for coordinates (N, 2, h, w).
    """
    side = 2 * radius + 1
    d = torch.linspace(-radius, radius, side, device=centroids_coords.device)
    delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).view(1, side, side, 2)
    n, _, h, w = centroids_coords.shape
    coords = centroids_coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    indexed = []
    for corr_volume in pyramid:
        indexed.append(_bilinear_lookup(corr_volume, coords + delta).view(n, h, w, -1))
        coords = coords / 2
    return torch.cat(indexed, dim=-1).permute(0, 3, 1, 2).contiguous()


class RAFTFlow(nn.Module):
    """torchvision's RAFT-large, returning only the final upsampled flow.

    Unlike torchvision's forward (which upsamples the flow at every iteration and keeps them all),
    only the last iteration's flow is upsampled; the result is the same. The coordinates and the
    correlation lookups stay in float32 whatever the weights' dtype, so the network can run in
    bfloat16 without losing sub-pixel precision; the flow is returned in float32. Nothing in a call
    waits for the GPU, and `compile_iterations()` compiles the refinement step that runs `iters` times.
    """

    def __init__(self):
        super().__init__()
        self.raft = raft_large(weights=None, progress=False)
        self._compiled_iteration = None

    def compile_iterations(self, **compile_kwargs) -> None:
        """torch.compile the per-iteration update (correlation lookup, motion encoder, GRU, flow
        head): one graph with static shapes, reused by every iteration of every call."""
        self._compiled_iteration = torch.compile(self.iteration, dynamic=False, **compile_kwargs)

    def iteration(
        self, pyramid: list[torch.Tensor], hidden: torch.Tensor, context: torch.Tensor, coords0: torch.Tensor, coords1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One refinement: the hidden state and the coordinates (float32) after it."""
        raft = self.raft
        corr = index_correlation_pyramid(pyramid, coords1, raft.corr_block.radius)
        hidden, delta = raft.update_block(hidden, context, corr.to(hidden.dtype), (coords1 - coords0).to(hidden.dtype))
        return hidden, coords1 + delta.float()

    @torch.no_grad()
    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 12, upsample: bool = True) -> torch.Tensor:
        """Flow (N, 2, H, W) in pixels from image1 to image2, images (N, 3, H, W) in [-1, 1]; with
        upsample=False RAFT's own estimate on its 1/8 grid, (N, 2, H/8, W/8), in full-resolution pixels."""
        if image1.shape != image2.shape or image1.dim() != 4 or image1.shape[1] != 3:
            raise InputError(f"RAFT takes two (N, 3, H, W) batches of the same shape, got {tuple(image1.shape)} and {tuple(image2.shape)}")
        if iters < 1:
            raise InputError(f"RAFT needs at least 1 iteration, got iters={iters}")
        n, _, h, w = image1.shape
        check_raft_size(h, w)
        raft = self.raft
        dtype = next(raft.parameters()).dtype
        image1, image2 = image1.to(dtype), image2.to(dtype)

        fmap1, fmap2 = torch.chunk(raft.feature_encoder(torch.cat([image1, image2], dim=0)), chunks=2, dim=0)
        raft.corr_block.build_pyramid(fmap1.float(), fmap2.float())
        # torchvision keeps the correlation pyramid on the module: take it off (it is the largest
        # tensor of the computation, and must not outlive the call).
        pyramid, raft.corr_block.corr_pyramid = raft.corr_block.corr_pyramid, []
        context_out = raft.context_encoder(image1)
        hidden_size = raft.update_block.hidden_state_size
        hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
        hidden, context = torch.tanh(hidden), torch.relu(context)

        coords0 = make_coords_grid(n, h // 8, w // 8, device=image1.device)
        coords1 = coords0.clone()
        iteration = self._compiled_iteration or self.iteration
        for _ in range(iters):
            hidden, coords1 = iteration(pyramid, hidden, context, coords0, coords1)
        if not upsample:
            return 8 * (coords1 - coords0)
        return upsample_flow(coords1 - coords0, up_mask=raft.mask_predictor(hidden).float())

    def bidirectional(
        self, frames_btchw: torch.Tensor, iters: int = 20, max_pairs_per_call: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flows between neighbouring frames: forward t -> t+1 and backward t+1 -> t, each (B, T-1, 2, H, W).

        All pairs of both directions go through RAFT as one batch (or in chunks of
        `max_pairs_per_call` pairs to bound memory); RAFT treats every pair independently.
        """
        if frames_btchw.dim() != 5 or frames_btchw.shape[1] < 2:
            raise InputError(f"bidirectional flow needs frames (B, T, 3, H, W) with T >= 2, got {tuple(frames_btchw.shape)}")
        b, t, c, h, w = frames_btchw.shape
        earlier = frames_btchw[:, :-1].reshape(-1, c, h, w)
        later = frames_btchw[:, 1:].reshape(-1, c, h, w)
        sources, targets = torch.cat([earlier, later]), torch.cat([later, earlier])
        step = max_pairs_per_call or sources.shape[0]
        flows = torch.cat([self(sources[i : i + step], targets[i : i + step], iters) for i in range(0, sources.shape[0], step)])
        flows_forward, flows_backward = flows.view(2, b, t - 1, 2, h, w).unbind(0)
        return flows_forward, flows_backward


def find_raft_file(path: str | Path) -> Path:
    """`path` itself, or the RAFT weights inside a folder (raft-things.pth, else one raft*.pth); for a
    pipeline folder, inside its raft/."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "raft").is_dir():
        path = path / "raft"
    for name in RAFT_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("raft*.pth"))
    if len(found) != 1:
        raise WeightsError(f"RAFT weights not found in {path}: expected raft-things.pth (download it from {RAFT_URL})")
    return found[0]


def load_raft(path: str | Path) -> RAFTFlow:
    """RAFT-large from `raft-things.pth` (original layout, `module.` prefix) or a torchvision weight file,
    given as the file, its folder, or a pipeline folder."""
    path = find_raft_file(path)
    state = read_torch_state_dict(path, "RAFT weights", RAFT_URL)
    model = RAFTFlow()
    torchvision_keys = list(model.raft.state_dict())
    if not any(k.startswith("feature_encoder.") for k in state):
        state = to_torchvision_layout(state, torchvision_keys, str(path))
    strict_load(model.raft, state, "RAFT weights", str(path))
    return model.eval()
