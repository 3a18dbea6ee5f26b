"""The trainer's training step, timed, per configuration: random weights, synthetic clips, no download.

    python bench/train_step.py --out $OUT/train_step.json         # the published recipe, then ours (one GPU)
    python bench/train_step.py --config experiment=published_recipe \\
        --config "experiment=paper_512x256 experiment.data.batch_size=2" --profile --out $OUT/ts.json
    torchrun --standalone --nproc-per-node 4 bench/train_step.py --config experiment=paper_512x256 \\
        --out $OUT/ts_x4.json                                                                # weak scaling
    python bench/train_step.py --device cpu --steps 1 --warmup 1 experiment.model.random_init=tiny \\
        experiment.model.raft_iters=2 experiment.model.frozen_dtype=float32 experiment.data.num_frames=4 \\
        experiment.data.height=128 experiment.data.width=128                                # CPU smoke test

A configuration is the trainer's own configuration: Hydra overrides of configs/ over the schema in
fff_vdi/config.py, exactly as launch/train.py takes them. `--config "OVERRIDES"` (repeatable, default
`experiment=published_recipe` then `experiment=paper_512x256`) names one; the positional overrides
apply to every configuration (its own win for the same key), after this benchmark's defaults,
`model=svd_xt_random experiment.data.shards=synthetic experiment.trainer.validate_every=0` (random
weights from the bundled configs; no data is read, no validation runs). Each configuration builds the
networks and the step with `fff_vdi.train.step.build_train_step` and runs `TrainStep`: the code the
trainer runs. Batches are synthetic, made on the device before timing (random clips in [-1, 1], the
configuration's moving rectangles), so `data_wait` is 0; bench/data.py measures the loader, the
trainer's metrics.jsonl the two together. What the trainer adds around the step: bench/README.md.

Measured per configuration, after `--warmup` steps (compilation happens there):
  - `step_s`: wall time of `--steps` un-instrumented steps / steps; `clips_per_s_per_gpu` = clips per
    step / step_s. `step_s_each`: each of those steps (clock marks at the step starts, no extra
    synchronisation), `step_s_median` their median.
  - `phases_s`: medians over `--steps` instrumented steps of the step's spans (fff_vdi/train/profiling.py:
    raft, flow_completion, vae, clip, unet_forward, backward, optimizer; `other` = the rest).
  - MFU = UNet forward+backward FLOPs (metrics.unet_train_flops, as run with the fast paths; the
    `*_reference_flops` figures count the published model) / time / 989 TFLOP/s.
  - peak memory over the timed steps (`_incl_warmup`: over all); with `--profile` an op table per
    configuration beside the JSON and, on CUDA, `unet_kernels` (profiling.profile_unet_kernels).
  - with several ranks every figure is the slowest rank's.
A failing configuration (out of memory, a bad key) is recorded with its error and the run goes on; the
JSON is rewritten after every configuration, and a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Before torch initialises CUDA: fewer fragmentation OOMs at large batches (allocated bytes, what
# the peak memory reports, are unchanged).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fff_vdi.config import ExperimentConfig, register_configs, validate  # noqa: E402
from fff_vdi.data.masks import draw_mask, plan_rectangles  # noqa: E402
from fff_vdi.distributed.env import init_distributed, is_distributed, shutdown  # noqa: E402
from fff_vdi.models.components import build_components  # noqa: E402
from fff_vdi.train.gc_schedule import ScheduledGC  # noqa: E402
from fff_vdi.train.metrics import PEAK_BF16_FLOPS, unet_train_flops  # noqa: E402
from fff_vdi.train.profiling import (  # noqa: E402
    PHASES, Clock, Phases, instrumented, profile_step, profile_table_path, profile_unet_kernels)
from fff_vdi.train.objective import CLEAN_FEATURES, DTYPES, CleanClipFeatures  # noqa: E402
from fff_vdi.train.step import backend_settings, build_train_step  # noqa: E402

DEFAULT_CONFIGS = ("experiment=published_recipe", "experiment=paper_512x256")
# Random weights from the bundled configs; the data key the schema requires, never read (synthetic
# batches); no validation runs here (its dtype rule does not apply).
BENCH_DEFAULTS = ("model=svd_xt_random", "experiment.data.shards=synthetic", "experiment.trainer.validate_every=0")
# Published-recipe figures measured on one H200 (issue #7), for the table's reference row.
ISSUE_PUBLISHED_H200 = {"step_s": 0.805, "clips_per_s_per_gpu": 1.24, "peak_memory_gib": 42.9,
                        "phases_s": {"raft": 0.19, "flow_completion": 0.07, "vae": 0.14, "clip": 0.003,
                                     "unet_forward": 0.19, "backward": 0.20, "optimizer": 0.014}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every configuration")
    p.add_argument("--config", action="append", dest="configs", metavar="OVERRIDES",
                   help="one configuration: space-separated Hydra overrides (repeat for more; default: "
                        + ", then ".join(DEFAULT_CONFIGS) + ")")
    p.add_argument("--steps", type=int, default=10, help="timed steps (instrumented, then as many un-instrumented)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning, optimizer "
                                                         "state; on 4 GPUs the third compiled step still took 3 s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/train_step_<card>[_xN].json)")
    p.add_argument("--profile", action="store_true", help="one extra step per configuration under torch.profiler "
                   "(op table beside the JSON) and, on CUDA, the UNet's kernels by class")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no configuration after this many seconds (0: no limit); skipped ones are recorded")
    p.add_argument("--data-batches", type=int, default=2, help="distinct synthetic batches, cycled")
    p.add_argument("--conditioning", choices=("online", "cached"), default="online",
                   help="cached: batches carry the clean clips' features as a conditioning cache delivers them "
                        "(no RAFT, clean-clip VAE encode or CLIP in the step), as launch/train.py with experiment.data.conditioning")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (a check: 'eager' traces "
                                                          "without compiling, cheap on the CPU); default inductor")
    p.add_argument("--reset-dynamo", choices=("auto", "always"), default="auto",
                   help="between configurations: reset torch.compile's caches only when they keep memory alive (auto) or always")
    args = p.parse_args(argv)
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    for name in ("steps", "warmup", "data_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def merged_overrides(common: list[str], config: str) -> list[str]:
    """This benchmark's defaults, the common overrides, then the configuration's: a later value of the
    same key wins."""
    merged: dict[str, str] = {}
    for item in (*BENCH_DEFAULTS, *common, *config.split()):
        merged[item.split("=", 1)[0].lstrip("+~")] = item
    return list(merged.values())


def compose(overrides: list[str]) -> ExperimentConfig:
    """The experiment configuration launch/train.py would get from these overrides, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg: ExperimentConfig = OmegaConf.to_object(hydra_compose("config", overrides=overrides).experiment)
    return validate(cfg)


def synthetic_batches(cfg: ExperimentConfig, n: int, device: torch.device, seed: int,
                      embed_dim: int | None = None) -> list[dict]:
    """Random clips in [-1, 1] and the configuration's moving rectangles, made on the device. With
    `embed_dim` (--conditioning cached) each batch also carries the clean clip's features as the
    conditioning cache delivers them (objective.CLEAN_FEATURES: random values of the cache's shapes and
    dtypes), so the conditioner runs only what depends on the mask, as in the trainer with a cache."""
    d = cfg.data
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shape = (d.batch_size, d.num_frames, 3, d.height, d.width)
    batches = [{"pixel_values": torch.rand(shape, generator=gen, device=device) * 2 - 1,
                "mask_values": torch.stack([draw_mask(plan_rectangles(rng, d.num_frames, d.height, d.width, d.masks.rect, 0),
                                                      d.height, d.width, device) for _ in range(d.batch_size)])}
               for _ in range(n)]
    if embed_dim is not None:
        b, t = d.batch_size, d.num_frames
        flow_size = (round(d.height * cfg.model.flow_scale), round(d.width * cfg.model.flow_scale))
        frozen = DTYPES[cfg.model.frozen_dtype]

        def randn(*size, dtype=torch.float32):
            return torch.randn(size, generator=gen, device=device).to(dtype)

        for batch in batches:
            batch[CLEAN_FEATURES] = CleanClipFeatures(
                randn(b, t - 1, 2, *flow_size), randn(b, t - 1, 2, *flow_size),
                randn(b, t, 8, d.height // 8, d.width // 8, dtype=frozen), randn(b, 1, embed_dim, dtype=frozen))
    return batches


def run_steps(train_step, batches, first: int, n: int, clock: Clock, gc_schedule: ScheduledGC,
              phases_per_step: list | None = None, marks: list | None = None):
    """n steps, as the trainer's loop runs them; with `phases_per_step` each is instrumented (its
    totals appended); else `marks` (if given) gets a mark at each step's start and one after the last.
    Returns the last step's StepOutput."""
    for step in range(first, first + n):
        if phases_per_step is None:
            if marks is not None:
                marks.append(clock.mark())
            out = train_step(batches, step)
        else:
            phases = Phases(clock)
            with instrumented(train_step.conditioner, phases):
                start = clock.mark()
                out = train_step(batches, step, phases=phases)
                end = clock.mark()
            clock.sync()
            phases_per_step.append({**phases.totals(), "step": clock.seconds(start, end)})
        gc_schedule.tick()
    if marks is not None:
        marks.append(clock.mark())
    return out


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


def run_config(name: str, cfg: ExperimentConfig, args, dist, out_stem: Path, log) -> dict:
    device, cuda = dist.device, dist.device.type == "cuda"
    clock = Clock(device)
    d, t = cfg.data, cfg.trainer
    result: dict[str, Any] = {"name": name, "experiment": cfg.name, "config": dataclasses.asdict(cfg), "status": "running"}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    counters_before = dynamo_counters()
    tick = time.perf_counter()
    compile_kwargs = {"backend": args.compile_backend} if args.compile_backend else None
    with backend_settings(cfg.parallel, t.deterministic), ScheduledGC(t.gc_every) as gc_schedule:
        components = build_components(cfg.model, seed=t.seed, device=device)
        unet_config = dict(components.unet.config)
        embed_dim = components.image_encoder.config.projection_dim if args.conditioning == "cached" else None
        train_step = build_train_step(cfg, dist, components, compile_kwargs)
        del components
        result["build_s"] = time.perf_counter() - tick
        log(f"{name}: built in {result['build_s']:.1f} s; warming up ({args.warmup} steps)")
        batches = itertools.cycle(synthetic_batches(cfg, args.data_batches, device, seed=123 + dist.rank, embed_dim=embed_dim))
        warmup_s = []
        for i in range(args.warmup):
            t0 = time.perf_counter()
            run_steps(train_step, batches, i, 1, clock, gc_schedule)
            clock.sync()
            warmup_s.append(time.perf_counter() - t0)
            log(f"{name}: warm-up step {i + 1} {warmup_s[-1]:.2f} s")
        result["warmup_step_s"] = warmup_s
        if cuda:
            result["peak_memory_gib_incl_warmup"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)

        marks: list = []  # un-instrumented: the end-to-end figure, and each step from the marks
        clock.sync()
        t0 = time.perf_counter()
        last = run_steps(train_step, batches, args.warmup, args.steps, clock, gc_schedule, marks=marks)
        clock.sync()
        step_s = (time.perf_counter() - t0) / args.steps
        window = [clock.seconds(a, b) for a, b in zip(marks, marks[1:])]
        log(f"{name}: {step_s:.3f} s/step un-instrumented (steps: {', '.join(f'{x:.3f}' for x in window)}); timing phases")
        per_step: list[dict] = []  # instrumented: where the time goes
        run_steps(train_step, batches, args.warmup + args.steps, args.steps, clock, gc_schedule, phases_per_step=per_step)
        phases = {p: median([s[p] for s in per_step]) for p in (*PHASES, "step")}
        phases["other"] = max(0.0, phases["step"] - sum(phases[p] for p in PHASES))
        result.update(final_loss=last.loss, nonfinite_skips=train_step.nonfinite_skips,
                      overflow_skips=train_step.overflow_skips)
        if cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if args.profile:
            next_step = args.warmup + 2 * args.steps
            result["profile"] = profile_step(train_step, batches, next_step, profile_table_path(out_stem, name), dist.is_main)
            if cuda:
                flops = unet_train_flops(unet_config, t.trainable, d.batch_size, d.num_frames, d.height, d.width,
                                         cfg.parallel.fast_paths)
                try:  # an extra: its failure must not cost the configuration's figures
                    result["unet_kernels"] = profile_unet_kernels(train_step, next(batches), next_step + 1, flops)
                except Exception as e:  # noqa: BLE001
                    result["unet_kernels"] = {"error": f"{type(e).__name__}: {e}"}
        del train_step

    figures = reduce_max({"step_s": step_s, **{f"phase_{k}": v for k, v in phases.items()},
                          **{f"window_{i:04d}": x for i, x in enumerate(window)},
                          **{k: result[k] for k in ("peak_memory_gib", "peak_memory_gib_incl_warmup", "peak_reserved_gib")
                             if k in result}}, device)
    result.update({k: figures[k] for k in ("peak_memory_gib", "peak_memory_gib_incl_warmup", "peak_reserved_gib") if k in figures})
    step_s = figures["step_s"]
    window = [figures[f"window_{i:04d}"] for i in range(len(window))]
    phases = {k: figures[f"phase_{k}"] for k in (*PHASES, "other", "step")}
    clips = d.batch_size * t.grad_accum
    flops = t.grad_accum * unet_train_flops(unet_config, t.trainable, d.batch_size, d.num_frames, d.height, d.width,
                                            cfg.parallel.fast_paths)
    reference = t.grad_accum * unet_train_flops(unet_config, t.trainable, d.batch_size, d.num_frames, d.height, d.width)
    unet_s = phases["unet_forward"] + phases["backward"]
    counters_after = dynamo_counters()
    result.update({
        "status": "ok", "batch_per_gpu": clips, "world_size": dist.world_size,
        "step_s": step_s, "step_s_each": window, "step_s_median": median(window),
        "clips_per_s_per_gpu": clips / step_s, "clips_per_s_total": clips * dist.world_size / step_s,
        "instrumented_step_s": phases.pop("step"), "phases_s": {**phases, "data_wait": 0.0},
        "unet_flops_per_step": flops, "unet_flops_per_clip": flops // clips, "reference_unet_flops_per_clip": reference // clips,
        "unet_mfu": flops / unet_s / PEAK_BF16_FLOPS, "step_mfu": flops / step_s / PEAK_BF16_FLOPS,
        "unet_mfu_reference_flops": reference / unet_s / PEAK_BF16_FLOPS,
        "step_mfu_reference_flops": reference / step_s / PEAK_BF16_FLOPS,
        "compile": {"graph_breaks": counters_after["graph_breaks"] - counters_before["graph_breaks"],
                    "unique_graphs": counters_after["unique_graphs"] - counters_before["unique_graphs"],
                    "break_reasons": [r for r in counters_after["break_reasons"] if r not in counters_before["break_reasons"]]},
    })
    result["instrumentation_cost_s"] = result["instrumented_step_s"] - step_s
    return result


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
    head = ("| config | clips/s/GPU | step s | RAFT | flow c. | VAE | CLIP | UNet fwd | bwd | optim | other "
            "| UNet MFU | step MFU | peak GiB | x published |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, d=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    if report.get("device_type") == "cuda":
        ref, p = ISSUE_PUBLISHED_H200, ISSUE_PUBLISHED_H200["phases_s"]
        lines.append(f"| issue #7: published, H200 | {ref['clips_per_s_per_gpu']:.2f} | {ref['step_s']:.3f} | "
                     + " | ".join(f"{p[k]:.3f}" for k in PHASES) + f" | - | - | - | {ref['peak_memory_gib']:.1f} | - |")
    for r in report["configs"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('status')}: {str(r.get('error', ''))[:60]} |" + " |" * 13)
            continue
        ph = r["phases_s"]
        lines.append(f"| {r['name']} | {r['clips_per_s_per_gpu']:.2f} | {r['step_s']:.3f} | "
                     + " | ".join(fmt(ph[k]) for k in (*PHASES, "other"))
                     + f" | {100 * r['unet_mfu']:.1f}% | {100 * r['step_mfu']:.1f}% | {fmt(r.get('peak_memory_gib'), 1)} | "
                       f"{fmt(r.get('speedup_vs_published'), 2)} |")
    return "\n".join(lines)


def compile_signature(cfg: ExperimentConfig) -> tuple | None:
    """The settings that change compiled code without failing dynamo's guards (inductor's layout);
    None for a configuration that compiles nothing."""
    p = cfg.parallel
    return (p.force_channels_last,) if p.compile or p.compile_frozen else None


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
    register_configs()
    quiet_known_warnings()
    started = time.perf_counter()
    dist = init_distributed(device_type=args.device)
    device = dist.device

    def log(msg: str) -> None:
        if dist.is_main:
            print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # variants add entries; never fall back to eager silently
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break
    out = Path(args.out) if args.out else default_out(device, dist.world_size)
    import diffusers

    report: dict[str, Any] = {
        "benchmark": "bench/train_step.py", "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": card_name(device), "device_type": device.type,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "world_size": dist.world_size,
        "steps": {"warmup": args.warmup, "timed": args.steps}, "peak_flops": PEAK_BF16_FLOPS,
        "conditioning": args.conditioning,
        "notes": [
            "data_wait is 0: synthetic batches are made on the device before timing; the loader is measured by bench/data.py",
            "phases are CUDA-event spans without synchronisation (fff_vdi/train/profiling.py)",
            "MFU = UNet fwd+bwd FLOPs (metrics.unet_train_flops, meta device, no recomputation; as run) / time / 989 TFLOP/s",
            "with several ranks every figure is the slowest rank's",
        ],
        "configs": [],
    }
    log(f"{report['card']}, torch {torch.__version__}, world {dist.world_size}; configs: {args.configs}; out {out}")
    last_signature = None
    for config in args.configs:
        name = config.strip() or "(common overrides)"
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            report["configs"].append({"name": name, "status": "skipped", "error": f"time budget of {args.time_budget_s:.0f} s spent"})
            log(f"{name}: skipped (time budget)")
            continue
        try:
            overrides = merged_overrides(args.overrides, config)
            cfg = compose(overrides)
            log(f"{name}: {' '.join(overrides)}")
            signature = compile_signature(cfg)
            if signature is not None and last_signature not in (None, signature):
                torch._dynamo.reset()  # its guards do not cover these settings: no compiled code may carry over
            last_signature = signature or last_signature
            result = run_config(name, cfg, args, dist, out.with_suffix(""), log)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not cost the others' results
            kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
            result = {"name": name, "status": "error", "error": f"{kind}: {str(e)[:400]}",
                      "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                result["peak_memory_gib_at_error"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(f"{name}: FAILED {result['error']}")
        release(result, device, args.reset_dynamo)
        report["configs"].append(result)
        published = next((r for r in report["configs"] if r.get("experiment") == "published_recipe"
                          and r.get("status") == "ok"), None)
        for r in report["configs"]:
            if published is not None and r.get("status") == "ok":
                r["speedup_vs_published"] = r["clips_per_s_per_gpu"] / published["clips_per_s_per_gpu"]
        if result.get("status") == "ok":
            log(f"{name}: {result['clips_per_s_per_gpu']:.2f} clips/s/GPU, {result['step_s']:.3f} s/step, "
                f"UNet MFU {100 * result['unet_mfu']:.1f}%, peak {result.get('peak_memory_gib', float('nan')):.1f} GiB; "
                + ", ".join(f"{k} {v:.3f}" for k, v in result["phases_s"].items()))
        if dist.is_main:
            write_json(out, report)
    report["total_s"] = time.perf_counter() - started
    if dist.is_main:
        write_json(out, report)
        print("\n" + markdown_table(report), flush=True)
        print(f"\nresults: {out}", flush=True)
    shutdown()
    return 0 if all(r.get("status") == "ok" for r in report["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
