"""Reading a conditioning cache for training: start-up checks, per-clip records, batched tensors.

    cache = ConditioningCache.open(cfg.data.conditioning)
    cache.check_serves(cfg, backend)           # one-line ConfigError naming the key it cannot serve
    cache.check_networks(components, cfg)      # the frozen networks' weights, once built
    records = cache.clip_records(...)          # in the loader's reader processes: three uint8 arrays
    batch.update(cache.assemble(batched, device))  # in the training process: views of whole batches

The batch then carries the clips' CleanClipFeatures (train/objective.py), and the step's conditioner
runs no RAFT, no clean-clip VAE encode and no CLIP: only flow completion in the holes, the masked
clip's noise-augmented encode, and the UNet.

The reader processes (DALI's parallel external source, DataLoader workers) read each clip's records
with one `preadv` per record straight into the arrays they hand over (crc32 checked there, off the
training process); the training process only reinterprets each batch's bytes as tensors of the
records' dtypes and shapes (`Tensor.view`), on the GPU for the DALI backend: nothing per clip.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fff_vdi.config import DataConfig, ExperimentConfig
from fff_vdi.conditioning.format import (
    REBUILD_HINT,
    TOOL,
    RecordShapes,
    describe_shard_change,
    embed_member,
    flows_member,
    image_shard_identity,
    load_manifest,
    load_unit_index,
    moments_member,
    resize_flows,
)
from fff_vdi.data.plan import steps_in_use
from fff_vdi.data.shards import load_manifest as load_image_manifest
from fff_vdi.errors import ConfigError, DataError
from fff_vdi.models.components import Components
from fff_vdi.train.objective import CLEAN_FEATURES, DTYPES, CleanClipFeatures
from fff_vdi.utils.files import DescriptorCache

log = logging.getLogger(__name__)

KINDS = ("moments", "embeds", "flows")


@dataclass(frozen=True)
class CachedVideo:
    """Where one video's records lie: (offset, size, crc32) rows, one per frame (per pair for flows)."""

    unit: str
    num_frames: int
    moments: np.ndarray  # (num_frames, 3) int64
    embeds: np.ndarray
    flows: dict[int, np.ndarray]  # frame step -> (num_frames - step, 3)


def open_training_cache(cfg: ExperimentConfig, backend: str) -> "ConditioningCache | None":
    """The cache `cfg.data.conditioning` names, checked to serve `cfg` exactly; None when it names none."""
    if not cfg.data.conditioning:
        return None
    cache = ConditioningCache.open(cfg.data.conditioning, cfg.data.verify_crc)
    cache.check_serves(cfg, backend)
    return cache


class ConditioningCache:
    """A finished cache folder (fff_vdi.conditioning.format). Picklable: the reader processes carry
    it; file descriptors are opened lazily per process, like the image shards'."""

    def __init__(self, root: Path, manifest: dict, videos: dict[tuple[str, str], CachedVideo], verify_crc: bool):
        self.root = root
        self.args = manifest["args"]
        self.shapes = RecordShapes.of(self.args)
        self.videos = videos
        self.verify_crc = verify_crc
        self._files = DescriptorCache()

    @classmethod
    def open(cls, root: str | os.PathLike, verify_crc: bool = True) -> "ConditioningCache":
        root = Path(root)
        manifest = load_manifest(root)
        videos = {}
        for unit in manifest["units"]:
            for v in load_unit_index(root, unit)["videos"]:
                videos[(v["shard"], v["key"])] = CachedVideo(
                    unit["name"], v["num_frames"], np.asarray(v["moments"], np.int64).reshape(-1, 3),
                    np.asarray(v["embeds"], np.int64).reshape(-1, 3),
                    {int(s): np.asarray(rows, np.int64).reshape(-1, 3) for s, rows in v["flows"].items()})
        return cls(root, manifest, videos, verify_crc)

    # -- start-up checks -------------------------------------------------------------------------

    def check_serves(self, cfg: ExperimentConfig, backend: str) -> None:
        """Raise ConfigError (naming the key) unless this cache gives exactly what the online
        conditioning would compute for `cfg`: same frames (image shards, split, resolution, decoder),
        the same frozen-network settings, and flows for every frame step a clip can take."""
        d, m, a = cfg.data, cfg.model, self.args
        where = f"the conditioning cache {self.root} (experiment.data.conditioning)"
        rebuild = f"use the cache's value or build a cache for this run with {TOOL}"
        for key, ours, theirs in (("data.split", d.split, a["split"]), ("data.height", d.height, a["height"]),
                                  ("data.width", d.width, a["width"]), ("data.backend", backend, a["decode_backend"]),
                                  ("model.raft_iters", m.raft_iters, a["raft_iters"]),
                                  ("model.flow_scale", m.flow_scale, 1.0),  # RAFT on the whole frames
                                  ("model.frozen_dtype", m.frozen_dtype, a["frozen_dtype"])):
            if ours != theirs:
                raise ConfigError(f"experiment.{key}", ours, f"{where} was made with {theirs!r}: {rebuild}")
        approximations = {"flows_float16": (a["flow_dtype"] != "float32", f"in {a['flow_dtype']}, not in float32"),
                          "flows_eighth": (a["flow_resolution"] != "full", "on the latent grid (1/8), not at full "
                                                                           "resolution")}
        for name, (made, how) in approximations.items():
            if made and name not in d.conditioning_approximate:
                raise ConfigError("experiment.data.conditioning_approximate", list(d.conditioning_approximate),
                                  f"{where} stores RAFT's flows {how}: ask for that approximation by name "
                                  f"([{name}]; its measured error is in the README), or build an exact cache")
        current = image_shard_identity(load_image_manifest(Path(d.shards)), d.split)
        if current != a["image_shards"]["shards"]:
            raise ConfigError("experiment.data.shards", d.shards,
                              f"the image shards changed since {where} was made from them "
                              f"({describe_shard_change(a['image_shards']['shards'], current)}): {rebuild}")
        self._check_steps(d)

    def _check_steps(self, d: DataConfig) -> None:
        for (shard, key), video in self.videos.items():
            missing = sorted(steps_in_use(video.num_frames, d) - set(video.flows))
            if missing:
                raise ConfigError("experiment.data.frame_steps", list(d.frame_steps),
                                  f"clips of video {key} ({video.num_frames} frames, {shard}) can take frame step "
                                  f"{missing[0]} with data.num_frames={d.num_frames} and short_video_policy="
                                  f"{d.short_video_policy}, which the conditioning cache {self.root} holds no flows "
                                  f"for (it has {sorted(video.flows)}): build a cache for these settings with {TOOL}")

    def check_networks(self, components: Components, cfg: ExperimentConfig) -> None:
        """Raise ConfigError, naming the key the weights came from, unless the frozen networks' weights
        are those the cache was made with."""
        from fff_vdi.conditioning.compute import network_fingerprints

        m = cfg.model
        weights = ("experiment.model.random_init", m.random_init) if m.random_init else ("experiment.model.pretrained", m.pretrained)
        sources = {"vae_encoder": weights, "image_encoder": weights, "clip_preprocessing": weights,
                   "raft": ("experiment.model.raft", m.raft) if m.raft and not m.random_init else weights}
        for name, digest in network_fingerprints(components, DTYPES[m.frozen_dtype]).items():
            recorded = self.args["networks"].get(name)
            if recorded != digest:
                key, value = sources[name]
                raise ConfigError(key, value, f"its {name} weights (sha256 {digest[:12]}...) are not those the "
                                              f"conditioning cache {self.root} was made with ({str(recorded)[:12]}...): "
                                              f"use those weights or build a cache with these ({TOOL})")
        log.info("conditioning from the cache %s: RAFT flows, clean latent distributions, CLIP embeddings", self.root)

    # -- in the reader processes -----------------------------------------------------------------

    def video(self, shard: str, key: str) -> CachedVideo:
        try:
            return self.videos[(shard, key)]
        except KeyError:
            raise DataError(f"{self.root}: no records of video {key} ({shard}); {REBUILD_HINT}") from None

    def clip_records(self, shard: str, key: str, frame_indices: tuple[int, ...]) -> list[np.ndarray]:
        """The records of one clip as three uint8 arrays: the moments of its frames, the embedding of
        its first frame, and for each pair of neighbours (a, b) the flow a -> b then b -> a (a window
        that reflects at the video's end also has pairs with b < a: their record is read swapped)."""
        video = self.video(shard, key)
        sizes = {kind: self.shapes.nbytes(kind) for kind in KINDS}
        moments = np.empty(len(frame_indices) * sizes["moments"], np.uint8)
        for t, i in enumerate(frame_indices):
            self._read_into(video, video.moments[i], moments_member(key, i), [moments[t * sizes["moments"]:][:sizes["moments"]]])
        embed = np.empty(sizes["embeds"], np.uint8)
        self._read_into(video, video.embeds[frame_indices[0]], embed_member(key, frame_indices[0]), [embed])
        size, half = sizes["flows"], sizes["flows"] // 2
        flows = np.empty((len(frame_indices) - 1) * size, np.uint8)
        for t, (a, b) in enumerate(zip(frame_indices, frame_indices[1:])):
            step, first = abs(b - a), min(a, b)
            slot = flows[t * size:][:size]
            if step not in video.flows or first >= len(video.flows[step]):
                raise DataError(f"{self.root}: no flows of video {key} between frames {a} and {b}; {REBUILD_HINT}")
            parts = [slot] if b > a else [slot[half:], slot[:half]]
            self._read_into(video, video.flows[step][first], flows_member(key, step, first), parts)
        return [moments, embed, flows]

    def _read_into(self, video: CachedVideo, member: np.ndarray, name: str, parts: list[np.ndarray]) -> None:
        offset, size, crc = (int(x) for x in member)
        got = os.preadv(self._files.get(self.root / video.unit), parts, offset)
        if got != size or sum(p.nbytes for p in parts) != size:
            raise DataError(f"{self.root / video.unit}: record {name} is cut short ({got} of {size} bytes at offset "
                            f"{offset}); {REBUILD_HINT}")
        if self.verify_crc:
            found = 0
            for p in parts:
                found = zlib.crc32(p, found)
            if found != crc:
                raise DataError(f"{self.root / video.unit}: record {name} fails its crc32 check (offset {offset}, "
                                f"{size} bytes); {REBUILD_HINT}")

    def close(self) -> None:
        self._files.close()

    # -- in the training process -----------------------------------------------------------------

    def assemble(self, batched: list[torch.Tensor], device: torch.device) -> dict:
        """The batch entry of the clean clips' features (objective.CLEAN_FEATURES) from their records:
        `batched` holds the three kinds of `clip_records` stacked over the batch, (B, bytes) uint8 each.
        One view per kind (a copy to `device` first when the bytes arrive on the host)."""
        moments, embeds, flows = (x.to(device, non_blocking=True).contiguous() for x in batched)
        b = moments.shape[0]
        s = self.shapes
        moments = moments.view(s.frozen_dtype).view(b, -1, *s.moments)
        embeds = embeds.view(s.frozen_dtype).view(b, 1, s.embed_dim)
        flows = flows.view(s.flow_dtype).view(b, -1, *s.flows).float()
        if s.flow_resolution == "eighth":  # back to the clip's size for flow completion
            flows = resize_flows(flows, (s.height, s.width))
        return {CLEAN_FEATURES: CleanClipFeatures(flows[:, :, 0], flows[:, :, 1], moments, embeds)}
