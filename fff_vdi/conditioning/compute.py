"""The mask-independent conditioning of whole videos, and the fingerprint of the networks that make it.

`FrameEncoder` runs the frozen networks of a `FrozenConditioner` (so in the same dtype, and compiled
the same way) over every frame of a group of videos: the VAE posterior's parameters and the CLIP
embedding per frame, RAFT's flows per pair of frames, both directions in one call as the online
path does. Frames and pairs of several videos share calls; with `static_shapes` (compiled networks)
the last call of each kind is padded to the full size, so no new shape is ever compiled.
"""

from __future__ import annotations

import hashlib
import json

import torch

from fff_vdi.models.components import Components
from fff_vdi.models.encoders import clip_input_size, encode_image_embedding, latent_moments
from fff_vdi.train.objective import FrozenConditioner

VAE_FRAMES_PER_CALL = 16  # encode_frames' chunk: the online path's encoder calls


def network_fingerprints(components: Components, dtype: torch.dtype) -> dict[str, str]:
    """sha256 of the weights each cached quantity depends on, as they run (floating tensors in
    `dtype`): the VAE's encoder, the CLIP image encoder and its preprocessing, RAFT."""
    vae = components.vae
    fe = components.feature_extractor
    preprocessing = {"size": clip_input_size(fe), "image_mean": [float(x) for x in fe.image_mean],
                     "image_std": [float(x) for x in fe.image_std]}
    return {
        "vae_encoder": _state_digest({**_prefixed("encoder", vae.encoder), **_prefixed("quant_conv", vae.quant_conv)}, dtype),
        "image_encoder": _state_digest(components.image_encoder.state_dict(), dtype),
        "clip_preprocessing": hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode()).hexdigest(),
        "raft": _state_digest(components.raft.state_dict(), dtype),
    }


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _state_digest(state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrameEncoder:
    def __init__(self, networks: FrozenConditioner, *, pairs_per_call: int = 16, embeds_per_call: int = 32,
                 static_shapes: bool = False):
        self.networks = networks
        self.pairs_per_call = pairs_per_call
        self.embeds_per_call = embeds_per_call
        self.static_shapes = static_shapes

    def _calls(self, n: int, per_call: int):
        """(start, stop, padding) of each call over n items."""
        for start in range(0, n, per_call):
            stop = min(start + per_call, n)
            yield start, stop, (per_call - (stop - start)) if self.static_shapes else 0

    @staticmethod
    def _padded(x: torch.Tensor, padding: int) -> torch.Tensor:
        return torch.cat([x, x[-1:].expand(padding, *x.shape[1:])]) if padding else x

    @torch.inference_mode()
    def moments(self, frames_nchw: torch.Tensor) -> torch.Tensor:
        """(N, 8, h, w): the VAE posterior's parameters of each frame, in the VAE's dtype."""
        out = [latent_moments(self.networks.vae, self._padded(frames_nchw[a:b], pad)[None], chunk=VAE_FRAMES_PER_CALL)[0, :b - a]
               for a, b, pad in self._calls(len(frames_nchw), VAE_FRAMES_PER_CALL)]
        return torch.cat(out)

    @torch.inference_mode()
    def embeds(self, frames_nchw: torch.Tensor) -> torch.Tensor:
        """(N, D): the CLIP image embedding of each frame (as `encode_first_frame` makes it)."""
        n = self.networks
        out = [encode_image_embedding(n.image_encoder, n.feature_extractor, self._padded(frames_nchw[a:b], pad))[:b - a, 0]
               for a, b, pad in self._calls(len(frames_nchw), self.embeds_per_call)]
        return torch.cat(out)

    @torch.inference_mode()
    def flows(self, frames_nchw: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(P, 2, 2, H, W) float32: for each pair p the flow from frame sources[p] to frame targets[p]
        and back; both directions of a call's pairs in one RAFT batch, as `RAFTFlow.bidirectional`."""
        n = self.networks
        out = []
        for a, b, pad in self._calls(len(sources), self.pairs_per_call):
            first = frames_nchw[self._padded(sources[a:b], pad)]
            second = frames_nchw[self._padded(targets[a:b], pad)]
            both = n.raft(torch.cat([first, second]), torch.cat([second, first]), n.raft_iters)
            out.append(torch.stack(both.chunk(2), dim=1)[:b - a])
        return torch.cat(out)
