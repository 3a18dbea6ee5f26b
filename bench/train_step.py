"""One FFF-VDI training step, timed: the published recipe (a) against ours (b), random weights, no download.

    PYTHONUNBUFFERED=1 python bench/train_step.py --out $OUT/train_step.json            # one GPU
    PYTHONUNBUFFERED=1 python bench/train_step.py --profile --time-budget-s 330 \\
        --configs published,ours:compile=0:frozen_compile=0,ours,ours:overlap=1,ours:raft_iters=12 \\
        --out $OUT/train_step_h100.json                                                  # the one-call sweep
    PYTHONUNBUFFERED=1 torchrun --standalone --nproc-per-node 4 bench/train_step.py --configs ours \\
        --out $OUT/train_step_h100_x4.json                                               # weak scaling
    python bench/train_step.py --model tiny --frames 4 --height 128 --width 128 --device cpu \\
        --steps 1 --warmup 1 --raft-iters 2                                              # CPU smoke test

What one step is (issue #7): RAFT both ways between neighbouring frames, flow completion in the holes,
two VAE encodes (the clip, and the masked clip with noise augmentation), the CLIP embedding of the
first frame, then the UNet's EDM loss forward, backward and the optimizer. Inputs are synthetic and
made on the device before timing: random clips in [-1, 1] and the project's moving-rectangle masks
(fff_vdi.data.masks). `data_wait` is therefore 0 here; the loader's own throughput is measured by the
data benchmark (bench/data.py), so the two together bound a real step.

Configurations (`--configs`, comma-separated; `name:key=value:key=value` overrides a setting):
  published  the published recipe built from our modules: fp32 UNet under fp16 autocast with a
             GradScaler, torch's default (foreach) AdamW, trainable = temporal transformer blocks +
             refiner, VAE/CLIP/RAFT/flow completion in fp16, RAFT 20 iterations, no activation
             checkpointing, no compile, no FSDP (DDP when started by torchrun with several ranks).
             Keys: batch, raft_iters.
  ours       the trainer's code path (FrozenConditioner, edm_loss, parallelize_unet = FSDP2 with bf16
             params and fp32 reduction even on one GPU, fused AdamW, the trainer's per-step loss and
             grad-norm checks) with the settings in OURS_DEFAULTS below (`--help-keys` lists them).
Examples: `--configs published,ours,ours:overlap=1`, `--configs ours:batch=2:ac=selective`.

Measured per configuration, after `--warmup` steps (compilation happens there):
  - `step_s`: wall time of `--steps` un-instrumented steps / steps (no synchronisation inside the
    window); `clips_per_s_per_gpu` = batch / step_s. This is the end-to-end figure. `step_s_each`:
    each of those steps (CUDA events at the step starts, still no synchronisation), `step_s_median`
    their median: a stall in one step shows there rather than as a slower mean.
  - `phases_s`: medians over `--steps` instrumented steps of CUDA-event spans (no synchronisation
    either: events mark the GPU's timeline, so a span includes GPU idle time while the CPU issues
    its kernels) for raft, flow_completion, vae (both encodes), clip, unet_forward (edm_loss),
    backward, optimizer; `other` is the rest of the step (noise draws, copies, preprocessing).
    `instrumentation_cost_s` = instrumented step minus step_s. With `overlap=1` the phases are
    measured without overlap (they could not be told apart otherwise).
  - MFU = UNet forward+backward FLOPs (torch.utils.flop_counter on the meta device, recomputation
    never counted, the same definition as the trainer's; for ours the FLOPs as run, i.e. with the fast
    paths) / time / 989 TFLOP/s: `unet_mfu` over unet_forward + backward, `step_mfu` over step_s.
  - peak memory: torch.cuda.max_memory_allocated over the timed steps (`_incl_warmup` over all).
  - with `--profile` (CUDA, ours): `unet_kernels`, one UNet forward+backward alone under the
    profiler, its kernels' time per class (matmul/conv, attention, inductor's fused kernels, layout
    transforms, copies, communication, other), the GPU's idle share, and the MFU the step would reach
    if only the FLOP-doing kernels (matmul/conv, attention) took time: the bound these kernels set.
  - with several ranks: every figure is the slowest (largest) rank's; clips/s per GPU and the world
    size are recorded, weak-scaling efficiency = clips/s per GPU at N / at 1 (separate runs).
A failing configuration (out of memory, a compile error) is recorded with its error and the run goes
on; the JSON is rewritten after every configuration, and a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Before torch initialises CUDA: fewer fragmentation OOMs at large batches (allocated bytes, what
# the peak memory reports, are unchanged).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fff_vdi.config import ObjectiveConfig, OptimConfig, ParallelConfig, RectangleMaskConfig  # noqa: E402
from fff_vdi.data.masks import draw_mask, plan_rectangles  # noqa: E402
from fff_vdi.distributed.env import all_reduce_mean, init_distributed, is_distributed, shutdown  # noqa: E402
from fff_vdi.distributed.parallelize import parallelize_unet  # noqa: E402
from fff_vdi.models.components import build_random_components  # noqa: E402
from fff_vdi.models.fast_paths import apply_fast_paths  # noqa: E402
from fff_vdi.models.unet import FFFVDIUNet  # noqa: E402
from fff_vdi.train.gc_schedule import ScheduledGC  # noqa: E402
from fff_vdi.train.metrics import PEAK_BF16_FLOPS, count_train_flops  # noqa: E402
from fff_vdi.train.objective import FrozenConditioner, edm_loss, step_generator  # noqa: E402
from fff_vdi.train.optim import build_optimizer, clip_grad_norm, mark_trainable, trainable_parameters  # noqa: E402

PHASES = ("raft", "flow_completion", "vae", "clip", "unet_forward", "backward", "optimizer")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 123  # the published seed (step generators); the random weights use seed 0

# Published-recipe figures measured on one H200 (issue #7), for the table's reference row.
ISSUE_PUBLISHED_H200 = {"step_s": 0.805, "clips_per_s_per_gpu": 1.24, "peak_memory_gib": 42.9,
                        "phases_s": {"raft": 0.19, "flow_completion": 0.07, "vae": 0.14, "clip": 0.003,
                                     "unet_forward": 0.19, "backward": 0.20, "optimizer": 0.014}}

# Settings of "ours": (default, allowed values or a type). "auto" resolves per device (on for CUDA,
# off on the CPU, where compiling the tiny model costs more than it saves).
OURS_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "batch": (None, int),  # None: --batch
    "compile": ("auto", bool),  # per-block torch.compile of the UNet (parallelize_unet)
    "fullgraph": (False, bool),  # compile blocks with fullgraph=True (errors on any graph break)
    "compile_backend": ("inductor", str),  # "eager"/"aot_eager" check tracing cheaply (CPU tests)
    "layout_opt": ("force", ("auto", "force")),  # inductor channels-last: its heuristic skips graphs
    # with a conv of in >= 2*out channels (every up block: skip concatenations; the refiner)
    "ac": ("off", ("off", "full", "selective")),  # activation checkpointing per block
    "ac_every": (2, int),  # with ac=selective: every n-th block
    "raft_iters": (None, int),  # None: --raft-iters (20, the published count)
    "flow_scale": (1.0, float),  # <1: RAFT and flow completion on downscaled frames (not published)
    "frozen_dtype": ("auto", ("auto", *DTYPES)),  # VAE/CLIP/RAFT/flow completion; auto: bf16 (fp32 on the CPU: faster there)
    "frozen_compile": ("auto", bool),  # compile the VAE encoder, RAFT encoders + iteration, flow completion
    "channels_last": (False, bool),  # frozen networks' weights channels-last (eager; compile decides itself)
    "fast_paths": (True, bool),  # fff_vdi.models.fast_paths: temporal convs as 2-D, single-key cross-attention
    "sdpa": ("auto", ("auto", "flash", "efficient", "cudnn", "math")),  # preferred SDPA kernel (math stays as fallback)
    "overlap": (False, bool),  # conditioning of step k+1 on a side stream during step k (CUDA)
    "reshard": (False, bool),  # FSDP2 reshard_after_forward (False: no second all-gather in backward)
    "shard_frozen": (False, bool),  # the trainer's parallel.shard_frozen (False: frozen UNet parameters replicated)
    "fused_adamw": (True, bool),
    "tf32": (True, bool),  # TF32 for fp32 matmuls (deformable convs, RAFT correlation), as the trainer sets
    "cudnn_benchmark": (True, bool),
    "checks": (True, bool),  # the trainer's per-step loss all-reduce and grad-norm (two host syncs)
    "gc_every": (50, int),  # the trainer's: automatic Python GC off, generation 1 every n steps (0: automatic)
}
PUBLISHED_KEYS = ("batch", "raft_iters")


# ------------------------------------------------------------------------------------------------
# arguments and configuration specs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="published,ours", help="comma-separated specs: name[:key=value...] (default: published,ours)")
    p.add_argument("--model", default="svd_xt", help="bundled config (svd_xt, tiny) or a folder of configs")
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="clips per GPU for ours (published: 1, the recipe's; "
                                                        "published:batch=N overrides)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (instrumented, then as many un-instrumented)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning, optimizer "
                                                         "state; on 4 GPUs the third compiled step still took 3 s)")
    p.add_argument("--raft-iters", type=int, default=20)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="ours: per-block compile of the UNet")
    p.add_argument("--frozen-compile", choices=("auto", "on", "off"), default="auto", help="ours: compile the frozen networks")
    p.add_argument("--ac", choices=("off", "full", "selective"), default="off", help="ours: activation checkpointing")
    p.add_argument("--frozen-dtype", choices=("auto", *DTYPES), default="auto", help="ours: frozen networks' dtype (auto: bf16, fp32 on the CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/train_step_<card>[_xN].json)")
    p.add_argument("--profile", action="store_true", help="one extra step per configuration under torch.profiler; "
                   "the op table goes next to the JSON, the top ops into it")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no configuration after this many seconds (0: no limit); skipped ones are recorded")
    p.add_argument("--data-batches", type=int, default=2, help="distinct synthetic batches, cycled")
    p.add_argument("--reset-dynamo", choices=("auto", "always"), default="auto",
                   help="between configurations: reset torch.compile's caches only when they keep memory alive (auto) or always")
    p.add_argument("--help-keys", action="store_true", help="list the keys of ours and their defaults, then exit")
    args = p.parse_args(argv)
    if args.help_keys:
        for key, (default, allowed) in OURS_DEFAULTS.items():
            kind = allowed.__name__ if isinstance(allowed, type) else "|".join(allowed)
            print(f"  {key:16s} default {default!s:10s} {kind}")
        sys.exit(0)
    for name in ("frames", "height", "width", "batch", "steps", "warmup", "raft_iters", "data_batches"):
        if getattr(args, name) < (2 if name == "frames" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'frames' else 1}, got {getattr(args, name)}")
    if args.height % 8 or args.width % 8 or min(args.height, args.width) < 128:
        p.error(f"--height/--width must be multiples of 8 of at least 128 (RAFT's pyramid), got {args.height}x{args.width}")
    return args


def _parse_value(key: str, raw: str, allowed) -> Any:
    if allowed is bool:
        if raw.lower() in ("1", "true", "on", "yes"):
            return True
        if raw.lower() in ("0", "false", "off", "no"):
            return False
        if raw == "auto":
            return "auto"
        raise ValueError(f"{key}={raw!r}: use 1/0, on/off or auto")
    if isinstance(allowed, type):
        try:
            return allowed(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: not a {allowed.__name__}") from None
    if raw not in allowed:
        raise ValueError(f"{key}={raw!r}: use one of {', '.join(allowed)}")
    return raw


@dataclass
class Spec:
    text: str  # as given, e.g. "ours:batch=2"
    kind: str  # "published" or "ours"
    settings: dict[str, Any] = field(default_factory=dict)


def parse_specs(text: str, args: argparse.Namespace, device: torch.device) -> list[Spec]:
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        kind, *pairs = item.split(":")
        if kind not in ("published", "ours"):
            raise ValueError(f"--configs: unknown configuration {kind!r} in {item!r} (use published or ours)")
        overrides = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or key not in OURS_DEFAULTS or (kind == "published" and key not in PUBLISHED_KEYS):
                keys = PUBLISHED_KEYS if kind == "published" else tuple(OURS_DEFAULTS)
                raise ValueError(f"--configs: {pair!r} in {item!r}: use key=value with a key of {kind}: {', '.join(keys)}")
            overrides[key] = _parse_value(key, raw, OURS_DEFAULTS[key][1])
        specs.append(Spec(item, kind, resolve_settings(kind, overrides, args, device)))
    if not specs:
        raise ValueError("--configs names no configuration")
    return specs


def resolve_settings(kind: str, overrides: dict, args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if kind == "published":  # the recipe's batch is 1: --batch is ours' (a published run at 2 took 73 GiB)
        return {"batch": overrides.get("batch", 1), "raft_iters": overrides.get("raft_iters", args.raft_iters)}
    cli = {"batch": args.batch, "raft_iters": args.raft_iters, "ac": args.ac, "frozen_dtype": args.frozen_dtype,
           "compile": {"on": True, "off": False}.get(args.compile, "auto"),
           "frozen_compile": {"on": True, "off": False}.get(args.frozen_compile, "auto")}
    s = {key: default for key, (default, _) in OURS_DEFAULTS.items()}
    s.update(cli)
    s.update(overrides)
    for key in ("compile", "frozen_compile"):
        if s[key] == "auto":
            s[key] = cuda
    if s["frozen_dtype"] == "auto":
        s["frozen_dtype"] = "bf16" if cuda else "fp32"
    if s["overlap"] and not cuda:
        s["overlap"] = False  # streams are CUDA's; recorded as resolved
    if (s["batch"] < 1 or s["raft_iters"] < 1 or s["ac_every"] < 1 or not 0 < s["flow_scale"] <= 1
            or s["gc_every"] < 0):
        raise ValueError(f"ours: batch, raft_iters, ac_every must be >= 1, gc_every >= 0 and flow_scale in (0, 1]: "
                         f"{s}")
    return s


# ------------------------------------------------------------------------------------------------
# timing


class Clock:
    """Marks on the device's timeline: CUDA events (recording one never synchronises) or wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Call after a synchronisation (CUDA events must have completed)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Phases:
    """Named spans of one step; a phase entered several times (the VAE's chunks) adds up."""

    def __init__(self, clock: Clock | None):
        self.clock = clock
        self.spans: list[tuple[str, Any, Any]] = []
        self._open: dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.clock is None:
            yield
            return
        start = self.clock.mark()
        try:
            yield
        finally:
            self.spans.append((name, start, self.clock.mark()))

    def begin(self, name: str) -> None:
        if self.clock is not None:
            self._open[name] = self.clock.mark()

    def end(self, name: str) -> None:
        if self.clock is not None and name in self._open:
            self.spans.append((name, self._open.pop(name), self.clock.mark()))

    def totals(self) -> dict[str, float]:
        out = {name: 0.0 for name in PHASES}
        for name, start, end in self.spans:
            out[name] = out.get(name, 0.0) + self.clock.seconds(start, end)
        return out


NO_PHASES = Phases(None)


@contextlib.contextmanager
def instrumented(conditioner: FrozenConditioner, phases: Phases):
    """Time the frozen networks inside the (unchanged) conditioner: wrappers on RAFT's bidirectional
    call and the VAE's encode, hooks on flow completion and the CLIP encoder; removed on exit."""
    raft, vae = conditioner.raft, conditioner.vae
    bidirectional, encode = raft.bidirectional, vae.encode

    def timed_bidirectional(*a, **k):
        with phases("raft"):
            return bidirectional(*a, **k)

    def timed_encode(*a, **k):
        with phases("vae"):
            return encode(*a, **k)

    raft.bidirectional, vae.encode = timed_bidirectional, timed_encode
    handles = []
    for module, name in ((conditioner.flow_completion, "flow_completion"), (conditioner.image_encoder, "clip")):
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: phases.begin(n)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: phases.end(n)))
    try:
        yield
    finally:
        del raft.bidirectional, vae.encode  # the instance attributes: the methods show through again
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# inputs, FLOPs


def synthetic_batches(n: int, batch: int, frames: int, height: int, width: int, device: torch.device, seed: int):
    """Random clips in [-1, 1] and the published moving-rectangle masks, made on the device."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = torch.rand((batch, frames, 3, height, width), generator=gen, device=device) * 2 - 1
        masks = torch.stack([draw_mask(plan_rectangles(rng, frames, height, width, RectangleMaskConfig(), 0), height, width, device)
                             for _ in range(batch)])
        out.append((pixels, masks))
    return out


_FLOPS: dict[tuple, int] = {}


def unet_flops(unet_config: dict, batch: int, frames: int, height: int, width: int, fast_paths: bool) -> int:
    """FLOPs of one UNet forward + backward (temporal blocks + refiner trained) on the meta device,
    without activation checkpointing: the trainer's `unet_train_flops`, optionally with the fast paths."""
    key = (json.dumps(unet_config, sort_keys=True, default=str), batch, frames, height, width, fast_paths)
    if key not in _FLOPS:
        with torch.device("meta"):
            unet = FFFVDIUNet.from_config(unet_config).to("meta")
            if fast_paths:
                apply_fast_paths(unet)
            mark_trainable(unet, "temporal")
            h, w = height // 8, width // 8
            sample = torch.randn(batch, frames, 2 * unet.config.out_channels, h, w)
            masks = torch.zeros(batch, frames, 1, height, width)
            flows = (torch.zeros(batch, frames - 1, 2, height, width),) * 2
            embeds = torch.randn(batch, 1, unet.config.cross_attention_dim)

        def run():
            with torch.device("meta"):
                unet(sample, masks, flows, torch.ones(batch), embeds, torch.ones(batch, 3)).float().square().mean().backward()

        _FLOPS[key] = count_train_flops(run)
    return _FLOPS[key]


# ------------------------------------------------------------------------------------------------
# the two configurations


@dataclass
class Built:
    """A configuration ready to step: `step(batch, gen, phases)` runs one full training step."""

    step: Callable
    conditioner: FrozenConditioner
    unet: torch.nn.Module
    compute_dtype: torch.dtype
    after_backward: Callable  # (loss, phases): optimizer and checks; the overlapped loop's last part
    batch: int
    flops_per_step: int  # UNet forward + backward of `batch` clips, as run
    reference_flops_per_step: int  # the same without the fast paths (the published model's count)
    notes: list[str] = field(default_factory=list)
    counters: dict[str, Callable[[], int]] = field(default_factory=dict)  # read once the timed steps are done
    gc_schedule: ScheduledGC = field(default_factory=lambda: ScheduledGC(0))  # entered around the steps


def build_published(s: dict, args, dist, components) -> Built:
    device = dist.device
    cuda = device.type == "cuda"
    unet = components.unet
    mark_trainable(unet, "temporal")
    unet.train()
    model = unet
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if cuda else None)
    # The published code casts the frozen networks to fp16 (fp32 on the CPU: no fp16 kernels there).
    conditioner = FrozenConditioner(components, ObjectiveConfig(), s["raft_iters"], torch.float16 if cuda else torch.float32, device)
    o = OptimConfig()
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    objective = ObjectiveConfig()
    calls = {"optimizer": 0}

    def optimizer_step(phases: Phases) -> None:
        with phases("optimizer"):
            scaler.step(optimizer)  # skips the update when the scaled gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            calls["optimizer"] += 1

    def after_backward(loss: torch.Tensor, phases: Phases) -> None:
        optimizer_step(phases)

    def skipped_steps() -> int:
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        return calls["optimizer"] - int(state["step"]) if "step" in state else calls["optimizer"]

    def step(batch, gen, phases: Phases) -> torch.Tensor:
        pixels, masks = batch
        cond = conditioner(pixels, masks, gen)
        with phases("unet_forward"), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = edm_loss(model, cond, objective, gen, torch.float32)
        with phases("backward"):
            scaler.scale(loss).backward()
        optimizer_step(phases)
        return loss.detach()

    ref = unet_flops(dict(unet.config), s["batch"], args.frames, args.height, args.width, False)
    notes = [] if cuda else ["CPU: fp32 without autocast or GradScaler (fp16 is CUDA's)"]
    if dist.world_size > 1:
        notes.append("DDP over the ranks (accelerate's default for the published code)")
    return Built(step, conditioner, model, torch.float32, after_backward, s["batch"], ref, ref, notes,
                 counters={"grad_scaler_skipped_steps": skipped_steps})


def build_ours(s: dict, args, dist, components) -> Built:
    device = dist.device
    notes = []
    unet = components.unet
    unet_config = dict(unet.config)
    if s["fast_paths"]:
        changed = apply_fast_paths(unet)
        notes.append(f"fast paths: {changed}")
    mark_trainable(unet, "temporal")
    unet.train()
    pcfg = ParallelConfig(activation_checkpointing=s["ac"], selective_every=s["ac_every"], compile=s["compile"],
                          fsdp=True, reshard_after_forward=s["reshard"], shard_frozen=s["shard_frozen"],
                          mixed_precision="bfloat16", force_channels_last=s["layout_opt"] == "force",
                          fast_paths=s["fast_paths"])
    compile_kwargs = {"fullgraph": s["fullgraph"], "backend": s["compile_backend"]}
    unet = parallelize_unet(unet, pcfg, dist.world_size, device, compile_kwargs=compile_kwargs)
    params = trainable_parameters(unet)
    o = OptimConfig(fused=s["fused_adamw"])
    optimizer = build_optimizer(params, o, device)
    objective = ObjectiveConfig()
    conditioner = FrozenConditioner(components, objective, s["raft_iters"], DTYPES[s["frozen_dtype"]], device,
                                    flow_scale=s["flow_scale"])
    if s["channels_last"]:
        for module in (conditioner.vae, conditioner.raft, conditioner.flow_completion):
            torch.nn.Module.to(module, memory_format=torch.channels_last)  # 4-D weights only
    if s["frozen_compile"]:
        conditioner.compile(backend=s["compile_backend"])
    compute_dtype = torch.bfloat16
    state = {"last_loss": None, "nonfinite": 0}
    gc_schedule = ScheduledGC(s["gc_every"])

    def optimizer_step(phases: Phases) -> None:
        with phases("optimizer"):
            if s["checks"]:  # what Trainer.train_step does besides the update: global loss and grad norm
                grad_norm = clip_grad_norm(params, 0.0)
                loss = all_reduce_mean(state["last_loss"].float().view(1)).item()
                if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
                    state["nonfinite"] += 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        gc_schedule.tick()

    def step(batch, gen, phases: Phases) -> torch.Tensor:
        pixels, masks = batch
        cond = conditioner(pixels, masks, gen)
        with phases("unet_forward"):
            loss = edm_loss(unet, cond, objective, gen, compute_dtype)
        with phases("backward"):
            loss.backward()
        state["last_loss"] = loss.detach()
        optimizer_step(phases)
        return state["last_loss"]

    def after_backward(loss: torch.Tensor, phases: Phases) -> None:
        state["last_loss"] = loss.detach()
        optimizer_step(phases)

    as_run = unet_flops(unet_config, s["batch"], args.frames, args.height, args.width, s["fast_paths"])
    ref = unet_flops(unet_config, s["batch"], args.frames, args.height, args.width, False)
    if s["flow_scale"] != 1.0:
        notes.append(f"flow_scale {s['flow_scale']}: RAFT and flow completion on downscaled frames (coarser flows, not the published recipe)")
    if s["raft_iters"] != 20:
        notes.append(f"RAFT {s['raft_iters']} iterations (published: 20)")
    return Built(step, conditioner, unet, compute_dtype, after_backward, s["batch"], as_run, ref, notes,
                 counters={"nonfinite_steps": lambda: state["nonfinite"]}, gc_schedule=gc_schedule)


# ------------------------------------------------------------------------------------------------
# global switches per configuration


@contextlib.contextmanager
def global_switches(kind: str, s: dict, device: torch.device):
    """TF32, cuDNN autotuning, SDPA kernels, inductor layout: ours' choices, the published code's
    (torch's defaults); restored afterwards."""
    import torch._inductor.config as inductor_config

    import torch._functorch.config as functorch_config

    cuda_b = torch.backends.cuda
    saved = (cuda_b.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             cuda_b.flash_sdp_enabled(), cuda_b.mem_efficient_sdp_enabled(), cuda_b.math_sdp_enabled(),
             cuda_b.cudnn_sdp_enabled() if hasattr(cuda_b, "cudnn_sdp_enabled") else None,
             inductor_config.force_layout_optimization, getattr(functorch_config, "enable_autograd_cache", None))
    try:
        if kind == "published":
            cuda_b.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = False, True, False
        else:
            cuda_b.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s["tf32"]
            torch.backends.cudnn.benchmark = s["cudnn_benchmark"]
            inductor_config.force_layout_optimization = s["layout_opt"] == "force"
            if s["sdpa"] != "auto":
                cuda_b.enable_flash_sdp(s["sdpa"] == "flash")
                cuda_b.enable_mem_efficient_sdp(s["sdpa"] == "efficient")
                if hasattr(cuda_b, "enable_cudnn_sdp"):
                    cuda_b.enable_cudnn_sdp(s["sdpa"] == "cudnn")
                cuda_b.enable_math_sdp(True)  # the fallback for calls the chosen kernel cannot take
                if saved[-1] is not None:  # AOTAutograd's cache key ignores these flags: no stale graph
                    functorch_config.enable_autograd_cache = False
        yield
    finally:
        (cuda_b.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, flash, mem, math_,
         cudnn_sdp, inductor_config.force_layout_optimization, autograd_cache) = saved
        if autograd_cache is not None:
            functorch_config.enable_autograd_cache = autograd_cache
        cuda_b.enable_flash_sdp(flash)
        cuda_b.enable_mem_efficient_sdp(mem)
        cuda_b.enable_math_sdp(math_)
        if cudnn_sdp is not None:
            cuda_b.enable_cudnn_sdp(cudnn_sdp)


# ------------------------------------------------------------------------------------------------
# running one configuration


def run_sequential(built: Built, batches, first_step: int, n: int, clock: Clock, rank: int, phases_per_step: list | None,
                   marks: list | None = None):
    """n steps one after the other; with `phases_per_step` each is instrumented (its totals appended).
    Un-instrumented, `marks` (if given) gets a clock mark at each step's start and one after the last:
    per-step times without synchronising."""
    loss = None
    for i in range(n):
        index = first_step + i
        gen = step_generator(SEED, rank, index, 0, built.conditioner.device)
        if phases_per_step is None:
            if marks is not None:
                marks.append(clock.mark())
            loss = built.step(batches[index % len(batches)], gen, NO_PHASES)
            continue
        phases = Phases(clock)
        with instrumented(built.conditioner, phases):
            start = clock.mark()
            loss = built.step(batches[index % len(batches)], gen, phases)
            end = clock.mark()
        clock.sync()
        totals = phases.totals()
        totals["step"] = clock.seconds(start, end)
        phases_per_step.append(totals)
    if marks is not None and phases_per_step is None:
        marks.append(clock.mark())
    return loss


class OverlappedLoop:
    """Steps with the conditioning of step k+1 computed on a side stream while step k's UNet runs.

    Per step: the UNet forward of step k is issued, then step k+1's conditioning on the side stream,
    then step k's backward and optimizer. Step k waits (on the GPU) for its conditioning's event, and
    its tensors are recorded on the main stream so that their memory is not reused early. Each step
    has its own generator, drawn first by the conditioning and then by the loss: the same draws as
    the sequential loop. The loop keeps one conditioning prepared ahead across calls, so a timed
    window of n steps holds n UNet steps and n conditionings, as in the steady state."""

    def __init__(self, built: Built, batches, rank: int):
        self.built, self.batches, self.rank = built, batches, rank
        self.device = built.conditioner.device
        self.main, self.side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        self.objective = ObjectiveConfig()
        self.pending = None

    def prepare(self, index: int):
        gen = step_generator(SEED, self.rank, index, 0, self.device)
        pixels, masks = self.batches[index % len(self.batches)]
        # The inputs were made (and synchronised) before timing; a loader's batch would need
        # side.wait_event(batch_ready) here.
        with torch.cuda.stream(self.side):
            cond = self.built.conditioner(pixels, masks, gen)
            ready = torch.cuda.Event()
            ready.record(self.side)
        return index, cond, gen, ready

    def run(self, first_step: int, n: int, clock: Clock | None = None, marks: list | None = None) -> torch.Tensor:
        """`marks` (with `clock`) gets a mark at each step's start and one after the last."""
        if self.pending is None or self.pending[0] != first_step:
            self.pending = self.prepare(first_step)
        loss = None
        for i in range(n):
            if marks is not None:
                marks.append(clock.mark())
            _, cond, gen, ready = self.pending
            self.main.wait_event(ready)
            for t in (cond.latents, cond.cond_latents, cond.cond_sigma, cond.image_embeds, cond.masks,
                      cond.flows_forward, cond.flows_backward):
                t.record_stream(self.main)
            loss = edm_loss(self.built.unet, cond, self.objective, gen, self.built.compute_dtype)
            self.pending = self.prepare(first_step + i + 1)
            loss.backward()
            self.built.after_backward(loss, NO_PHASES)
            del cond
        if marks is not None:
            marks.append(clock.mark())
        return loss.detach()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def reduce_max(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every rank's figures -> the largest of each (the slowest rank sets the pace)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "break_reasons": list(counters["graph_break"])[:5]}


def profile_step(built: Built, batches, index: int, rank: int, out_stem: Path, name: str, cuda: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    gen = step_generator(SEED, rank, index, 0, built.conditioner.device)
    with profile(activities=activities) as prof:
        built.step(batches[index % len(batches)], gen, NO_PHASES)
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()

    def self_time(e) -> float:  # microseconds
        if not cuda:
            return e.self_cpu_time_total
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return getattr(e, attr)
        return 0.0

    table = None
    for sort_by in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=sort_by, row_limit=60)
            break
        except (KeyError, AttributeError, ValueError):
            continue
    path = out_stem.parent / f"{out_stem.name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}_profile.txt"
    if rank == 0 and table is not None:
        path.write_text(table)
    top = sorted(averages, key=self_time, reverse=True)[:15]
    return {"table": str(path), "top_ops_self_ms": [{"op": e.key[:80], "ms": round(self_time(e) / 1e3, 3), "calls": e.count} for e in top]}


# Kernel classes of the UNet profile: the first class whose fragment is in a kernel's lower-cased name.
# Inductor's kernels come first: their names carry the aten ops they fuse ("..._fused_convolution_...").
KERNEL_CLASSES = (
    ("fused_triton", ("triton",)),
    ("communication", ("nccl",)),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul_conv", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "conv", "wgrad", "dgrad", "fprop")),
    ("copy", ("memcpy", "memset")),
)
FLOP_CLASSES = ("matmul_conv", "attention")  # where torch.utils.flop_counter's FLOPs are done


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for cls, fragments in KERNEL_CLASSES:
        if any(f in lowered for f in fragments):
            return cls
    return "other"


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize_kernels(kernels: list[tuple[str, float, float]], wall_s: float, flops: int) -> dict:
    """(name, start s, end s) of every GPU kernel of a UNet forward+backward -> time per class, the
    GPU's busy time (communication kept apart: it overlaps compute on its own stream), and the
    throughput of the kernels that do the counted FLOPs: the MFU the step would have if everything
    else took no time at all, an upper bound for these kernels at these shapes."""
    per_class: dict[str, float] = {}
    per_name: dict[str, float] = {}
    compute_spans = []
    for name, start, end in kernels:
        cls = kernel_class(name)
        per_class[cls] = per_class.get(cls, 0.0) + (end - start)
        per_name[name] = per_name.get(name, 0.0) + (end - start)
        if cls != "communication":
            compute_spans.append((start, end))
    busy = busy_seconds(compute_spans)
    flop_s = sum(per_class.get(c, 0.0) for c in FLOP_CLASSES)
    compute = sum(t for c, t in per_class.items() if c != "communication")
    top = sorted(per_name.items(), key=lambda kv: kv[1], reverse=True)[:25]
    return {
        "wall_s": wall_s,
        "compute_busy_s": busy,
        "gpu_idle_fraction": max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else float("nan"),
        "class_s": dict(sorted(per_class.items(), key=lambda kv: kv[1], reverse=True)),
        "class_share_of_compute": ({c: t / compute for c, t in per_class.items() if c != "communication"}
                                   if compute else {}),
        "flop_kernels_tflops": flops / flop_s / 1e12 if flop_s else float("nan"),
        "mfu_if_only_flop_kernels": flops / flop_s / PEAK_BF16_FLOPS if flop_s else float("nan"),
        "mfu_of_busy_time": flops / busy / PEAK_BF16_FLOPS if busy else float("nan"),
        "top_kernels_ms": [{"kernel": n[:120], "class": kernel_class(n), "ms": round(t * 1e3, 3)} for n, t in top],
    }


def profile_unet_kernels(built: Built, batches, index: int, rank: int) -> dict:
    """One UNet forward + backward alone (the conditioning made before) under torch.profiler, its
    GPU kernels summarised by class (`summarize_kernels`); then the optimizer step, as in training."""
    from torch.profiler import ProfilerActivity, profile

    device = built.conditioner.device
    gen = step_generator(SEED, rank, index, 0, device)
    pixels, masks = batches[index % len(batches)]
    cond = built.conditioner(pixels, masks, gen)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        loss = edm_loss(built.unet, cond, ObjectiveConfig(), gen, built.compute_dtype)
        loss.backward()
        torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - t0
    built.after_backward(loss, NO_PHASES)
    # GPU-side spans of record_function ranges (FSDP's "FSDP::pre_forward", ...) are not kernels.
    kernels = [(e.name, e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return summarize_kernels(kernels, wall_s, built.flops_per_step)


def run_config(spec: Spec, args, dist, out_stem: Path, log) -> dict:
    device = dist.device
    cuda = device.type == "cuda"
    clock = Clock(device)
    s = spec.settings
    result: dict[str, Any] = {"name": spec.text, "kind": spec.kind, "settings": s, "status": "running"}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    counters_before = dynamo_counters()
    tick = time.perf_counter()
    with global_switches(spec.kind, s, device), contextlib.ExitStack() as stack:
        components = build_random_components(args.model, seed=0, device=device)
        builder = build_published if spec.kind == "published" else build_ours
        built = builder(s, args, dist, components)
        del components
        stack.enter_context(built.gc_schedule)
        result["build_s"] = time.perf_counter() - tick
        log(f"{spec.text}: built in {result['build_s']:.1f} s; warming up ({args.warmup} steps)")
        batches = synthetic_batches(args.data_batches, built.batch, args.frames, args.height, args.width, device, seed=SEED + dist.rank)
        clock.sync()

        overlapped = OverlappedLoop(built, batches, dist.rank) if s.get("overlap") else None
        warmup_s = []
        for i in range(args.warmup):
            t0 = time.perf_counter()
            if overlapped is not None:
                overlapped.run(i, 1)
            else:
                run_sequential(built, batches, i, 1, clock, dist.rank, None)
            clock.sync()
            warmup_s.append(time.perf_counter() - t0)
            log(f"{spec.text}: warm-up step {i + 1} {warmup_s[-1]:.2f} s")
        result["warmup_step_s"] = warmup_s
        if cuda:
            result["peak_memory_gib_incl_warmup"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)

        # Un-instrumented: the end-to-end figure.
        first = args.warmup
        marks: list = []
        clock.sync()
        t0 = time.perf_counter()
        if overlapped is not None:
            loss = overlapped.run(first, args.steps, clock, marks)
        else:
            loss = run_sequential(built, batches, first, args.steps, clock, dist.rank, None, marks)
        clock.sync()
        step_s = (time.perf_counter() - t0) / args.steps
        # Step by step (from the marks): a mean hides whether every step is slow or one stalls.
        window = [clock.seconds(a, b) for a, b in zip(marks, marks[1:])]
        overlapped = None  # drops the conditioning it prepared for the next step
        log(f"{spec.text}: {step_s:.3f} s/step un-instrumented (steps: {', '.join(f'{t:.3f}' for t in window)}); "
            "timing phases")

        # Instrumented: where the time goes.
        per_step: list[dict] = []
        run_sequential(built, batches, first + args.steps, args.steps, clock, dist.rank, per_step)
        phases = {name: median([p[name] for p in per_step]) for name in (*PHASES, "step")}
        phases["other"] = max(0.0, phases["step"] - sum(phases[n] for n in PHASES))
        final_loss = float(loss.float().item())
        result.update({name: read() for name, read in built.counters.items()})
        if cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30

        if args.profile:
            result["profile"] = profile_step(built, batches, first + 2 * args.steps, dist.rank, out_stem, spec.text, cuda)
            if cuda and spec.kind == "ours":
                try:  # an extra: its failure must not cost the configuration's figures
                    result["unet_kernels"] = profile_unet_kernels(built, batches, first + 2 * args.steps + 1, dist.rank)
                except Exception as e:
                    result["unet_kernels"] = {"error": f"{type(e).__name__}: {e}"}

    figures = {"step_s": step_s, **{f"phase_{k}": v for k, v in phases.items()},
               **{f"window_{i:04d}": t for i, t in enumerate(window)}}
    for key in ("peak_memory_gib", "peak_memory_gib_incl_warmup", "peak_reserved_gib"):
        if key in result:
            figures[key] = result[key]
    figures = reduce_max(figures, device)
    step_s = figures["step_s"]
    window = [figures[f"window_{i:04d}"] for i in range(len(window))]
    phases = {k: figures[f"phase_{k}"] for k in (*PHASES, "other", "step")}
    for key in ("peak_memory_gib", "peak_memory_gib_incl_warmup", "peak_reserved_gib"):
        if key in figures:
            result[key] = figures[key]

    flops = built.flops_per_step
    unet_s = phases["unet_forward"] + phases["backward"]
    counters_after = dynamo_counters()
    result.update({
        "status": "ok",
        "batch_per_gpu": built.batch,
        "world_size": dist.world_size,
        "step_s": step_s,
        "step_s_each": window,
        "step_s_median": median(window),
        "clips_per_s_per_gpu": built.batch / step_s,
        "clips_per_s_total": built.batch * dist.world_size / step_s,
        "instrumented_step_s": phases.pop("step"),
        "phases_s": {**phases, "data_wait": 0.0},
        "unet_flops_per_step": flops,
        "unet_flops_per_clip": flops // built.batch,
        "reference_unet_flops_per_clip": built.reference_flops_per_step // built.batch,
        "unet_mfu": flops / unet_s / PEAK_BF16_FLOPS,
        "step_mfu": flops / step_s / PEAK_BF16_FLOPS,
        "unet_mfu_reference_flops": built.reference_flops_per_step / unet_s / PEAK_BF16_FLOPS,
        "step_mfu_reference_flops": built.reference_flops_per_step / step_s / PEAK_BF16_FLOPS,
        "final_loss": final_loss,
        "loss_finite": math.isfinite(final_loss),
        "compile": {"graph_breaks": counters_after["graph_breaks"] - counters_before["graph_breaks"],
                    "unique_graphs": counters_after["unique_graphs"] - counters_before["unique_graphs"],
                    "break_reasons": [r for r in counters_after["break_reasons"] if r not in counters_before["break_reasons"]]},
        "notes": built.notes,
    })
    result["instrumentation_cost_s"] = result["instrumented_step_s"] - step_s
    return result


# ------------------------------------------------------------------------------------------------
# reporting


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def default_out(device: torch.device, world_size: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card_name(device).lower()).strip("-")
    suffix = f"_x{world_size}" if world_size > 1 else ""
    return Path(__file__).resolve().parent / "results" / f"train_step_{slug}{suffix}.json"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def markdown_table(report: dict) -> str:
    rows = [r for r in report["configs"]]
    head = ("| config | clips/s/GPU | step s | RAFT | flow c. | VAE | CLIP | UNet fwd | bwd | optim | other "
            "| UNet MFU | step MFU | peak GiB | x (a) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, d=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    if report.get("device_type") == "cuda":
        ref = ISSUE_PUBLISHED_H200
        p = ref["phases_s"]
        lines.append(f"| issue #7: published, H200 | {ref['clips_per_s_per_gpu']:.2f} | {ref['step_s']:.3f} | {p['raft']:.3f} | "
                     f"{p['flow_completion']:.3f} | {p['vae']:.3f} | {p['clip']:.3f} | {p['unet_forward']:.3f} | "
                     f"{p['backward']:.3f} | {p['optimizer']:.3f} | - | - | - | {ref['peak_memory_gib']:.1f} | - |")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('status')}: {str(r.get('error', ''))[:60]} |" + " |" * 13)
            continue
        ph = r["phases_s"]
        lines.append(
            f"| {r['name']} | {r['clips_per_s_per_gpu']:.2f} | {r['step_s']:.3f} | {fmt(ph['raft'])} | {fmt(ph['flow_completion'])} | "
            f"{fmt(ph['vae'])} | {fmt(ph['clip'])} | {fmt(ph['unet_forward'])} | {fmt(ph['backward'])} | {fmt(ph['optimizer'])} | "
            f"{fmt(ph['other'])} | {100 * r['unet_mfu']:.1f}% | {100 * r['step_mfu']:.1f}% | {fmt(r.get('peak_memory_gib'), 1)} | "
            f"{fmt(r.get('speedup_vs_published'), 2)} |")
    return "\n".join(lines)


def compile_signature(spec: Spec) -> tuple | None:
    """The settings that change compiled code without failing dynamo's guards (inductor's layout,
    the SDPA kernel choice, the backend); None for a configuration that compiles nothing."""
    s = spec.settings
    if spec.kind != "ours" or not (s["compile"] or s["frozen_compile"]):
        return None
    return (s["layout_opt"], s["sdpa"], s["compile_backend"], s["fullgraph"])


def release(result: dict, device: torch.device, reset_dynamo: str) -> None:
    """Free the last configuration's memory before the next one. Dynamo's caches are kept (a
    variant with the same shapes then reuses the compiled code) unless they keep its tensors alive
    (more than 0.25 GiB left allocated) or `--reset-dynamo always`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        result["leftover_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    if reset_dynamo == "always" or result.get("leftover_allocated_gib", 0.0) > 0.25:
        torch._dynamo.reset()
        gc.collect()
        result["dynamo_reset"] = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
            result["leftover_allocated_gib_after_reset"] = torch.cuda.memory_allocated(device) / 2**30


def quiet_known_warnings() -> None:
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    # FSDP2 warns once per block class that returns views; no caller modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_known_warnings()
    started = time.perf_counter()
    dist = init_distributed(device_type=args.device)
    device = dist.device
    is_main = dist.rank == 0

    def log(msg: str) -> None:
        if is_main:
            print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # variants add entries; never fall back to eager silently
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break
    specs = parse_specs(args.configs, args, device)
    out = Path(args.out) if args.out else default_out(device, dist.world_size)
    out_stem = out.with_suffix("")
    import diffusers
    import torchvision

    report: dict[str, Any] = {
        "benchmark": "bench/train_step.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": card_name(device),
        "device_type": device.type,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "world_size": dist.world_size,
        "model": args.model,
        "shape": {"frames": args.frames, "height": args.height, "width": args.width},
        "steps": {"warmup": args.warmup, "timed": args.steps},
        "command": " ".join(sys.argv),
        "peak_flops": PEAK_BF16_FLOPS,
        "notes": [
            "data_wait is 0: synthetic batches are made on the device before timing; the loader is measured by bench/data.py",
            "phases are CUDA-event spans without synchronisation; with overlap=1 they come from sequential steps",
            "MFU = UNet fwd+bwd FLOPs (flop_counter, meta device, no recomputation; as run) / time / 989 TFLOP/s",
            "with several ranks every figure is the slowest rank's",
        ],
        "configs": [],
    }
    log(f"{report['card']}, torch {torch.__version__}, diffusers {diffusers.__version__}, world {dist.world_size}; "
        f"{args.model} at {args.frames}x{args.height}x{args.width}; configs: {', '.join(s.text for s in specs)}; out {out}")
    last_signature = None
    for spec in specs:
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            report["configs"].append({"name": spec.text, "kind": spec.kind, "settings": spec.settings, "status": "skipped",
                                      "error": f"time budget of {args.time_budget_s:.0f} s spent"})
            log(f"{spec.text}: skipped (time budget)")
            continue
        log(f"{spec.text}: {spec.settings}")
        signature = compile_signature(spec)
        if signature is not None and last_signature not in (None, signature):
            torch._dynamo.reset()  # its guards do not cover these settings: no compiled code may carry over
        last_signature = signature or last_signature
        try:
            result = run_config(spec, args, dist, out_stem, log)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not cost the others' results
            kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
            result = {"name": spec.text, "kind": spec.kind, "settings": spec.settings, "status": "error",
                      "error": f"{kind}: {str(e)[:400]}", "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                result["peak_memory_gib_at_error"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(f"{spec.text}: FAILED {result['error']}")
        release(result, device, args.reset_dynamo)
        report["configs"].append(result)
        published = next((r for r in report["configs"] if r["kind"] == "published" and r.get("status") == "ok"), None)
        for r in report["configs"]:
            if published is not None and r.get("status") == "ok":
                r["speedup_vs_published"] = r["clips_per_s_per_gpu"] / published["clips_per_s_per_gpu"]
        if result.get("status") == "ok":
            ph = result["phases_s"]
            log(f"{spec.text}: {result['clips_per_s_per_gpu']:.2f} clips/s/GPU, {result['step_s']:.3f} s/step, "
                f"UNet MFU {100 * result['unet_mfu']:.1f}%, step MFU {100 * result['step_mfu']:.1f}%, "
                f"peak {result.get('peak_memory_gib', float('nan')):.1f} GiB; "
                + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
        if is_main:
            write_json(out, report)
    report["total_s"] = time.perf_counter() - started
    if is_main:
        write_json(out, report)
        print("\n" + markdown_table(report), flush=True)
        print(f"\nresults: {out}", flush=True)
    shutdown()
    return 0 if all(r.get("status") == "ok" for r in report["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
