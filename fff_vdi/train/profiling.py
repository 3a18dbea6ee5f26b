"""Where a training step's time goes: phase spans, the op table, the UNet's kernels by class.

- `Phases` (with a `Clock`): named spans of one step on the device's timeline (CUDA events: recording
  one never synchronises, so a span includes GPU idle time while the CPU issues its kernels). The step
  (train/step.py) opens "unet_forward", "backward" and "optimizer"; `instrumented(conditioner, phases)`
  adds "raft", "flow_completion", "vae" and "clip" inside the frozen networks without changing them.
- `profile_step`: one whole step under torch.profiler, its op table (self time) written to a file.
- `profile_unet_kernels`: one UNet forward + backward alone under the profiler, its GPU kernels by
  class (`summarize_kernels`), and the MFU the step would reach if only the FLOP-doing kernels took time.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

import torch

from fff_vdi.train.metrics import PEAK_BF16_FLOPS

PHASES = ("raft", "flow_completion", "vae", "clip", "unet_forward", "backward", "optimizer")


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
    """Named spans of one step; a phase entered several times (the VAE's chunks) adds up. Without a
    clock (`NO_PHASES`) every span is a no-op."""

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
def instrumented(conditioner, phases: Phases):
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


def profile_step(train_step, batches, step: int, table_path: Path, write: bool) -> dict:
    """One step under torch.profiler: its op table (sorted by self time on the device, or the CPU) to
    `table_path` (when `write`), the 15 ops with the most self time returned."""
    from torch.profiler import ProfilerActivity, profile

    cuda = train_step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(batches, step)
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
    if write and table is not None:
        table_path.write_text(table)
    top = sorted(averages, key=self_time, reverse=True)[:15]
    return {"table": str(table_path), "top_ops_self_ms": [{"op": e.key[:80], "ms": round(self_time(e) / 1e3, 3), "calls": e.count} for e in top]}


def profile_table_path(stem: Path, name: str) -> Path:
    """`<stem>_<name>_profile.txt`, the name reduced to characters safe in file names."""
    return stem.parent / f"{stem.name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}_profile.txt"


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


def profile_unet_kernels(train_step, batch: dict, step: int, flops: int) -> dict:
    """One UNet forward + backward alone (its conditioning made before) under torch.profiler on CUDA,
    its GPU kernels summarised by class (`summarize_kernels`); then the step's update, as in training."""
    from torch.profiler import ProfilerActivity, profile

    from fff_vdi.train.objective import step_generator

    device = train_step.device
    gen = step_generator(train_step.cfg.trainer.seed, train_step.dist.rank, step, 0, device)
    cond = train_step.conditioner(batch, gen)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        loss = train_step.forward_backward(cond, gen, last_micro_step=True)
        torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - t0
    train_step.update([loss], step)
    # GPU-side spans of record_function ranges (FSDP's "FSDP::pre_forward", ...) are not kernels.
    kernels = [(e.name, e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return summarize_kernels(kernels, wall_s, flops)
