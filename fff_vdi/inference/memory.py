"""What inference may use of a GPU, and the settings that make it fit.

Three settings trade speed for GPU memory (none changes the result except `decode_chunk`):

- `ff_chunking`: the UNet's feed-forward layers run one frame at a time (diffusers'
  `enable_forward_chunking`): same output; at 1024x576x25 the UNet's activations fall from about
  9.3 to 6.0 GiB.
- `offload`: every network lives on the host and visits the GPU only while it runs, so the GPU holds
  one network's weights at a time (the UNet's 2.9 GiB in bf16 instead of all 4.2 GiB) plus that
  stage's activations. It costs the host-to-GPU copies: the UNet once per window.
- `decode_chunk`: frames per VAE call (encoding and decoding; 8 by default, as SVD). The temporal
  decoder's activations grow with it (about 1.9 GiB per million pixels of the chunk: 9.1 GiB for
  8 frames of 1024x576). Its decoder sees each chunk as a clip, so another chunk changes the
  result slightly.

Frames always stay on the host between windows (windows.py): the GPU holds one window at a time.

`plan_memory` estimates the peak of each configuration from the networks' weights and the activation
sizes below, and picks the first that fits the budget, from the fastest: as is; feed-forward chunking;
then offload; then smaller decode chunks. The activation sizes were counted with fake tensors (no
GPU) at SVD-XT size in bf16; their sum for 1024x576x25 without any saving (4.2 GiB of weights + the
decoder's 9.1) matches the 13.8 GiB measured on an H200 (bench/results/inpaint_h200.json).
bench/inpaint_memory.py measures every configuration against its estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fff_vdi.errors import InputError

GIB = 2**30
MEGAPIXEL = 1e6
# Activation bytes per million pixel-frames (a frame of H x W is H * W / 1e6 of them), SVD-XT size, bf16.
UNET_BYTES_PER_MPX = 0.525 * GIB  # the guidance batch of 2 included; constant part below
UNET_CHUNKED_BYTES_PER_MPX = 0.302 * GIB
UNET_BYTES_CONSTANT = 1.54 * GIB
DECODE_BYTES_PER_MPX = 1.95 * GIB  # per frame of the chunk
ENCODE_BYTES_PER_MPX = 1.22 * GIB
FLOW_COMPLETION_BYTES_PER_MPX = 0.25 * GIB
RAFT_BYTES_PER_MPX = 0.7 * GIB
RAFT_BYTES_MAX = 3.7 * GIB  # the correlation pyramid is capped (sampler.RAFT_CORRELATION_BUDGET_BYTES), its features besides
# What the caching allocator needs beyond the live tensors (fragmentation, rounding): the estimate must stay under this share of the budget.
USABLE_SHARE = 0.85
DECODE_CHUNKS = (8, 4, 2, 1)
DEFAULT_DECODE_CHUNK = DECODE_CHUNKS[0]


@dataclass(frozen=True)
class MemorySettings:
    offload: bool = False
    ff_chunking: bool = False
    decode_chunk: int = DEFAULT_DECODE_CHUNK

    def describe(self) -> str:
        return (f"offload {'on' if self.offload else 'off'}, feed-forward chunking {'on' if self.ff_chunking else 'off'}, "
                f"VAE chunk {self.decode_chunk}")


@dataclass(frozen=True)
class MemoryPlan:
    settings: MemorySettings
    budget_bytes: int | None  # None: not a GPU (nothing to plan)
    estimate_bytes: int | None
    fits: bool

    def describe(self) -> str:
        if self.budget_bytes is None:
            return self.settings.describe()
        verdict = "" if self.fits else " - more than the budget: expect out-of-memory; lower --height/--width or --window"
        return (f"{self.settings.describe()} (estimated peak {self.estimate_bytes / GIB:.1f} of "
                f"{self.budget_bytes / GIB:.1f} GiB{verdict})")


def device_budget_bytes(device: torch.device) -> int | None:
    """Bytes this process may allocate on a CUDA device: its total times the per-process fraction
    (torch.cuda.set_per_process_memory_fraction), at most what is free now plus what PyTorch already
    holds (other processes may use the card). None for other devices."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # new in PyTorch 2.6
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(total * fraction, free + torch.cuda.memory_reserved(device)))


NETWORKS = ("unet", "vae", "image_encoder", "raft", "flow_completion")


def network_bytes(components, dtype: torch.dtype) -> dict[str, int]:
    """{network: bytes of its weights in `dtype`} for the networks of a `Components`."""
    element = torch.empty((), dtype=dtype).element_size()
    return {name: sum(p.numel() for p in getattr(components, name).parameters()) * element for name in NETWORKS}


def estimate_peak_bytes(stage_weights: dict[str, int], height: int, width: int, window: int, settings: MemorySettings) -> int:
    """Peak device bytes of one window: per stage, the weights on the device then plus its activations,
    plus what the window keeps on the device throughout (frames, masks, flows, latents)."""
    window_mpx = height * width * window / MEGAPIXEL
    unet_rate = UNET_CHUNKED_BYTES_PER_MPX if settings.ff_chunking else UNET_BYTES_PER_MPX
    activations = {
        "flows": max(min(RAFT_BYTES_MAX, RAFT_BYTES_PER_MPX * window_mpx), FLOW_COMPLETION_BYTES_PER_MPX * window_mpx),
        "encode": ENCODE_BYTES_PER_MPX * height * width * settings.decode_chunk / MEGAPIXEL,
        "clip": 0.0,
        "unet": UNET_BYTES_CONSTANT + unet_rate * window_mpx,
        "decode": DECODE_BYTES_PER_MPX * height * width * settings.decode_chunk / MEGAPIXEL,
    }
    networks = {"flows": ("raft", "flow_completion"), "encode": ("vae",), "clip": ("image_encoder",), "unet": ("unet",), "decode": ("vae",)}
    kept = 4 * window * height * width * (3 + 1 + 2 * 2)  # float32 frames, masks, both flows (latents are 64x smaller)
    everything = sum(stage_weights.values())
    peaks = [
        (sum(stage_weights[n] for n in networks[stage]) if settings.offload else everything) + activation
        for stage, activation in activations.items()
    ]
    return int(max(peaks) + kept)


def candidate_settings() -> list[MemorySettings]:
    """From the fastest to the most frugal."""
    return [
        MemorySettings(),
        MemorySettings(ff_chunking=True),
        *(MemorySettings(offload=True, ff_chunking=True, decode_chunk=chunk) for chunk in DECODE_CHUNKS),
    ]


def plan_memory(
    device: torch.device,
    stage_weights: dict[str, int],
    height: int,
    width: int,
    window: int,
    *,
    offload: bool | None = None,
    ff_chunking: bool | None = None,
    decode_chunk: int | None = None,
    budget_bytes: int | None = None,
) -> MemoryPlan:
    """The settings for one window of `window` frames at height x width. Each of offload, ff_chunking
    and decode_chunk is taken as given, or (None) chosen: on a GPU the first candidate that fits
    USABLE_SHARE of the budget (default: `device_budget_bytes`), elsewhere the fastest."""
    if decode_chunk is not None and decode_chunk < 1:
        raise InputError(f"--decode-chunk {decode_chunk}: use 1 or more frames per VAE call")
    given = {k: v for k, v in (("offload", offload), ("ff_chunking", ff_chunking), ("decode_chunk", decode_chunk)) if v is not None}
    candidates = list(dict.fromkeys(replace(c, **given) for c in candidate_settings()))
    budget = budget_bytes if budget_bytes is not None else device_budget_bytes(device)
    if budget is None:
        return MemoryPlan(candidates[0], None, None, True)
    for settings in candidates:
        estimate = estimate_peak_bytes(stage_weights, height, width, window, settings)
        if estimate <= USABLE_SHARE * budget:
            return MemoryPlan(settings, budget, estimate, True)
    return MemoryPlan(settings, budget, estimate, False)
