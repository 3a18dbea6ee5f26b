"""The conditioning cache's format: names, record layouts, and reading its manifest and indexes.

A cache folder (written by `tools/precompute_conditioning.py`, see `fff_vdi.conditioning.writer`):

    manifest.json              written last: its presence means the folder is complete
    run.json                   the arguments of the run (written first; --resume compares them)
    cond-000000.tar            one tar per work unit: consecutive videos of the image shards' split
    cond-000000.index.json     the byte offset, size and crc32 of every record of the tar beside it

Records (tar members with the image shards' fixed metadata), per video of the split, in this order:

    <key>.f00000.moments ...   per frame: the VAE posterior's parameters (8, H/8, W/8): mean and
                               log-variance, in the frozen networks' dtype (training still samples)
    <key>.f00000.embed ...     per frame: the CLIP image embedding (D,), in the frozen networks' dtype
    <key>.s01.f00000.flows ... per frame step s and frame i < num_frames - s: RAFT's flow from frame
                               i to i+s, then from i+s to i, each (2, H, W) in `flow_dtype`; with
                               flow_resolution "eighth" (an approximation) each resized to the latent
                               grid, (2, H/8, W/8), as the UNet resizes flows for the refiner

The frames are the image shards' frames as the training loader decodes them with `data.crop=none`
(the whole frame resized to H x W), unflipped and unjittered. A unit's index is

    {"format": "fff-vdi-conditioning-index", "version": 1, "unit": "cond-000000.tar", "bytes", "sha256",
     "videos": [{"shard", "key", "video_id", "num_frames", "moments": [[offset, size, crc32], ...],
                 "embeds": [...], "flows": {"1": [...], "2": [...]}}, ...]}

and the manifest records the arguments (`args`: resolution, frame steps, RAFT iterations, dtypes,
decode backend, the image shards' split with every shard's name and sha256, the frozen networks'
weight fingerprints) and every unit with its sha256, bytes, index_sha256, videos and frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fff_vdi.data.shards import load_checked_index
from fff_vdi.errors import DataError

FORMAT = "fff-vdi-conditioning"
INDEX_FORMAT = "fff-vdi-conditioning-index"
VERSION = 1
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
TOOL = "tools/precompute_conditioning.py"
REBUILD_HINT = f"rebuild it with {TOOL} (or run {TOOL} --verify on it)"

# Storage dtypes by name; numpy has no bfloat16, so records are raw bytes viewed in torch.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENT_CHANNELS = 4


def unit_name(number: int) -> str:
    return f"cond-{number:06d}.tar"


def unit_index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".index.json"


def moments_member(key: str, i: int) -> str:
    return f"{key}.f{i:05d}.moments"


def embed_member(key: str, i: int) -> str:
    return f"{key}.f{i:05d}.embed"


def flows_member(key: str, step: int, i: int) -> str:
    return f"{key}.s{step:02d}.f{i:05d}.flows"


@dataclass(frozen=True)
class RecordShapes:
    """The shape and dtype of each kind of record, from a cache's arguments."""

    height: int
    width: int
    embed_dim: int
    frozen_dtype: torch.dtype
    flow_dtype: torch.dtype
    flow_resolution: str = "full"  # or "eighth": the latent grid

    @classmethod
    def of(cls, args: dict) -> "RecordShapes":
        return cls(args["height"], args["width"], args["embed_dim"], DTYPES[args["frozen_dtype"]],
                   DTYPES[args["flow_dtype"]], args["flow_resolution"])

    @property
    def moments(self) -> tuple[int, ...]:
        return (2 * LATENT_CHANNELS, self.height // 8, self.width // 8)

    @property
    def flows(self) -> tuple[int, ...]:
        """(direction: forward then backward, xy, H, W) at the stored resolution."""
        scale = 8 if self.flow_resolution == "eighth" else 1
        return (2, 2, self.height // scale, self.width // scale)

    def nbytes(self, kind: str) -> int:
        shape, dtype = {"moments": (self.moments, self.frozen_dtype), "embeds": ((self.embed_dim,), self.frozen_dtype),
                        "flows": (self.flows, self.flow_dtype)}[kind]
        return int(torch.Size(shape).numel()) * dtype.itemsize


def resize_flows(flows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Flows (..., 2, h, w) resized to `size` as the UNet resizes completed flows for the refiner
    (bilinear, align_corners=False; values stay in full-resolution pixels): how an "eighth" cache
    stores them, and how it brings them back to full resolution for flow completion."""
    lead = flows.shape[:-3]
    out = F.interpolate(flows.reshape(-1, *flows.shape[-3:]).float(), size=size, mode="bilinear", align_corners=False)
    return out.view(*lead, *out.shape[-3:])


def record_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    """A tensor's values in `dtype` as raw little-endian bytes (the record's payload)."""
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} is missing; {REBUILD_HINT}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: {what} cannot be read as JSON ({e}); {REBUILD_HINT}") from e


def load_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        unfinished = (root / RUN_NAME).is_file()
        raise DataError(f"{root}: not a finished conditioning cache (no {MANIFEST_NAME}); " + (
            f"finish it with {TOOL} --resume" if unfinished else f"make one with {TOOL}"))
    manifest = read_json(path, "the conditioning cache's manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected "
                        f"{FORMAT!r} version {VERSION}; {REBUILD_HINT}")
    return manifest


def load_unit_index(root: Path, unit: dict) -> dict:
    """The index of one manifest unit entry, checked against the manifest and the tar's size (the
    image shards' check: the cache is laid out like them)."""
    return load_checked_index(root, unit, member="unit", index_format=INDEX_FORMAT, version=VERSION,
                              missing_hint=REBUILD_HINT, damaged_hint=REBUILD_HINT, outdated_hint=REBUILD_HINT)


def image_shard_identity(image_manifest: dict, split: str) -> list[dict]:
    """The image shards of a split by name and sha256 (what a cache records it was made from)."""
    return [{"name": s["name"], "sha256": s["sha256"]} for s in image_manifest["splits"][split]["shards"]]


def describe_shard_change(recorded: list[dict], current: list[dict]) -> str:
    """The first difference between two image-shard identities, in words."""
    before, now = {s["name"]: s["sha256"] for s in recorded}, {s["name"]: s["sha256"] for s in current}
    for name in sorted(before.keys() | now.keys()):
        if name not in now:
            return f"{name} is gone"
        if name not in before:
            return f"{name} is new"
        if before[name] != now[name]:
            return f"{name} has sha256 {now[name][:12]}... now, {before[name][:12]}... then"
    return "the shards are listed in another order"
