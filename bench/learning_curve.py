"""Does it learn? A small FFF-VDI trained from scratch on synthetic videos, its validation over the
steps beside two references on the same clips: the untrained model and a classical fill.

    PYTHONUNBUFFERED=1 python bench/learning_curve.py --work /tmp/learning_curve --results-dir $OUT
    python bench/learning_curve.py --plot bench/results/learning_curve_h200.json     # PNG from a JSON

What it does, in one process (training in a child process, `launch/train.py` as a user runs it):

1. Data: `--videos` synthetic videos (fff_vdi.data.synthetic: textured backgrounds panning and shapes
   moving at known constant velocities), rendered at `--render-size` px and read at the training size
   (128 px: the loader resizes, so textures stay within reach of an 8x autoencoder), sharded by
   tools/shard_ytvos.py with `--val-fraction` of them held out for validation.
2. Pipeline: the bundled `--model-config` ("small": UNet 41M parameters) with random weights; RAFT
   and flow completion are the real architectures with random weights (their flows carry no
   information, so neither does the refiner's input); the VAE is fitted to the training clips for
   `--vae-steps` (fff_vdi/train/autoencoder.py), since a random VAE decodes nothing recognisable.
3. Training: experiment=learn_synthetic for `--train-minutes` (validations included). A calibration
   run of `--calibration-steps` validates the untrained model (step 0) and times a step and a
   validation; the run then resumes with the step count and validation interval that give
   `--validations` validations within the time.
4. The classical fill (fff_vdi/eval/baselines.py: temporal median of the visible pixels, Laplace
   interpolation where a pixel is never visible) on the same validation clips, scored by the same
   function as the validation (fff_vdi/train/validate.py: `score_inpainting`).
5. `<results-dir>/learning_curve_<card>.json` and, where matplotlib is installed, the PNG beside it
   (else `--plot JSON` renders it on another machine).

Every stage reuses what an earlier call finished in `--work` (shards, pipeline, checkpoints), so an
interrupted call continues. `--override KEY=VALUE` passes Hydra overrides to the experiment (the
CPU test runs the whole chain at a tiny size with them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fff_vdi.config import compose_experiment  # noqa: E402
from fff_vdi.utils.atomic import atomic_write_json  # noqa: E402

EXPERIMENT = "learn_synthetic"
# The calibration run validates only at its start: an interval no run reaches.
NEVER = 10**9


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--work", type=Path, help="folder for data, pipeline and run (reused by a later call)")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--card", default=None, help="name in the results' file name (default: from the GPU's name)")
    p.add_argument("--train-minutes", type=float, default=9.0, help="training time, validations included")
    p.add_argument("--validations", type=int, default=3, help="validations after step 0")
    p.add_argument("--calibration-steps", type=int, default=40)
    p.add_argument("--videos", type=int, default=340)
    p.add_argument("--val-fraction", type=float, default=0.06)
    p.add_argument("--video-frames", type=int, default=16)
    p.add_argument("--render-size", type=int, default=64, help="px of the rendered videos (square)")
    p.add_argument("--model-config", default="small", help="bundled config of the networks (fff_vdi/models/configs)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override (repeatable)")
    p.add_argument("--plot", type=Path, metavar="JSON", help="only render the PNG of a results JSON")
    args = p.parse_args(argv)
    if args.plot is None and args.work is None:
        p.error("--work is required (or --plot JSON)")
    return args


# ---------------------------------------------------------------------------------------------
# stages


def prepare_shards(args: argparse.Namespace, shards: Path) -> None:
    if (shards / "manifest.json").exists():
        log(f"shards: reusing {shards}")
        return
    from fff_vdi.data.synthetic import write_synthetic_videos

    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    src = args.work / "videos"
    log(f"data: {args.videos} synthetic videos of {args.video_frames} frames at {args.render_size} px ({workers} workers)")
    write_synthetic_videos(src, args.videos, args.video_frames, args.render_size, args.render_size, seed=args.seed,
                           with_annotations=False, workers=workers)
    run([sys.executable, str(REPO / "tools" / "shard_ytvos.py"), "--src", str(src), "--out", str(shards),
         "--val-fraction", str(args.val_fraction), "--workers", str(workers)], args.work / "shard.log")


def prepare_pipeline(args: argparse.Namespace, experiment, pipeline: Path, device: torch.device) -> dict:
    """Random networks from the bundled config with a VAE fitted to the training clips, saved as a pipeline."""
    stats_path = args.work / "autoencoder.json"
    if (pipeline / "model_index.json").exists() and stats_path.exists():
        log(f"pipeline: reusing {pipeline}")
        return json.loads(stats_path.read_text())
    from fff_vdi.data.loader import ClipLoader
    from fff_vdi.models import build_random_components, save_pipeline
    from fff_vdi.train.autoencoder import fit_autoencoder

    components = build_random_components(args.model_config, seed=args.seed, device=device)
    loader = ClipLoader(experiment.data, 0, 1, device)
    log(f"autoencoder: fitting the {args.model_config} VAE for {args.vae_steps} steps on {device}")
    try:
        stats = fit_autoencoder(components.vae, loader, args.vae_steps, lr=args.vae_lr,
                                log_every=max(1, args.vae_steps // 10))
    finally:
        loader.close()
    stats["reconstruction_psnr_db"] = 10 * float(torch.log10(torch.tensor(4.0 / stats["final_mse"])))
    log(f"autoencoder: reconstruction {stats['reconstruction_psnr_db']:.2f} dB after {stats['seconds']:.0f} s, "
        f"scaling factor {stats['scaling_factor']:.4f}")
    save_pipeline(components, pipeline)
    atomic_write_json(stats_path, stats)
    del components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stats


def train(args: argparse.Namespace, base: list[str], run_dir: Path) -> dict:
    """The calibration run, then the resumed run sized to the time budget; returns the plan."""
    train_s = 60 * args.train_minutes
    k = args.calibration_steps
    if not (run_dir / "validation.jsonl").exists() or not _checkpoints(run_dir):
        log(f"training: calibration ({k} steps, validation of the untrained model)")
        # Ending at max_steps=k and resuming with more is one run: the schedule is constant after a
        # warmup longer than the calibration, so no step's learning rate depends on max_steps.
        launch(base + [f"experiment.trainer.max_steps={k}", f"experiment.trainer.checkpoint_every={k}",
                       f"experiment.trainer.validate_every={NEVER}"], args.work / "train_calibration.log")
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] <= k]  # the plan: from the calibration alone
    step_s = statistics.median(r["step_time_s"] for r in steps[len(steps) // 2:])  # past the warm-up
    validation_s = read_jsonl(run_dir / "validation.jsonl")[0]["duration_s"]
    spent = sum(r["step_time_s"] for r in steps)
    remaining = train_s - spent - args.validations * validation_s
    more = int(remaining // step_s)
    if more < args.validations:
        raise SystemExit(f"error: --train-minutes {args.train_minutes} leaves no time to train: a step takes {step_s:.2f} s "
                         f"and a validation {validation_s:.1f} s; give more minutes or fewer --validations")
    every = max(1, (len(steps) + more) // args.validations)
    max_steps = every * args.validations
    plan = {"calibration_steps": len(steps), "step_s": step_s, "validation_s": validation_s, "max_steps": max_steps,
            "validate_every": every}
    log(f"training: {step_s:.3f} s per step, {validation_s:.1f} s per validation: {max_steps} steps, "
        f"validating every {every}")
    # A checkpoint at every validation: a call cut short (a time limit, SIGTERM: the trainer saves and
    # exits) loses at most one interval, and the next call with the same --work continues from it.
    launch(base + [f"experiment.trainer.max_steps={max_steps}", f"experiment.trainer.validate_every={every}",
                   f"experiment.trainer.checkpoint_every={every}"], args.work / "train.log")
    return plan


def classical_fill_scores(experiment, pipeline: Path, device: torch.device) -> dict:
    """The temporal-median fill on the validation clips, scored as the validation scores the model."""
    from fff_vdi.data.loader import ClipLoader
    from fff_vdi.eval.baselines import temporal_median_fill
    from fff_vdi.models.raft import load_raft
    from fff_vdi.train.validate import score_inpainting, validation_data_config

    t = experiment.trainer
    raft = load_raft(pipeline).to(device) if t.val_ewarp_flow == "raft" else None
    loader = ClipLoader(validation_data_config(experiment.data), 0, 1, device)
    scores = []
    try:
        for _ in range(t.val_clips):
            batch = next(loader)
            frames, masks = batch["pixel_values"][0], batch["mask_values"][0]
            fill = temporal_median_fill(frames, masks)
            scores.append(score_inpainting(frames, masks, fill, t.val_ewarp_flow, raft, experiment.model.raft_iters))
    finally:
        loader.close()
    return {k: statistics.fmean(s[k] for s in scores) for k in scores[0]}


# ---------------------------------------------------------------------------------------------
# helpers


def run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "a") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode}; its output ({log_path}) ends:\n{tail}")


def launch(overrides: list[str], log_path: Path) -> None:
    """launch/train.py as one process (a world of one), as a user starts it."""
    run([sys.executable, str(REPO / "launch" / "train.py"), *overrides], log_path)


def read_jsonl(path: Path) -> list[dict]:
    """Records by step; a step written twice (a resumed run) keeps its last record."""
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))


def card_slug(device: torch.device, card: str | None) -> tuple[str, str]:
    name = card or (torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = slug.removeprefix("nvidia-")
    return name, slug


def loss_per_interval(steps: list[dict], every: int) -> list[dict]:
    """Mean training loss over each validation interval (the raw per-step loss is noisy: one random sigma per clip)."""
    out = []
    for end in range(every, steps[-1]["step"] + 1, every):
        window = [r["loss"] for r in steps if end - every < r["step"] <= end and r["loss"] is not None]
        if window:
            out.append({"step": end, "loss": statistics.fmean(window)})
    return out


# ---------------------------------------------------------------------------------------------
# the plot


def plot(results_path: Path) -> Path | None:
    """The curve as a PNG beside the JSON; None (and a line saying how to make it) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed here: render the plot elsewhere with "
            f"python bench/learning_curve.py --plot {results_path}")
        return None
    results = json.loads(results_path.read_text())
    curve, classical = results["curve"], results["references"]["classical_fill"]
    steps = [r["step"] for r in curve]
    panels = [("hole_psnr_db", "PSNR inside the holes (dB)"), ("hole_ssim", "SSIM inside the holes"),
              ("ewarp_x1e3", "E_warp (x 10^-3, lower is better)"), ("loss", "training loss (mean per interval)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "loss":
            ax.plot([r["step"] for r in results["train_loss"]], [r["loss"] for r in results["train_loss"]], "o-", color="C0")
        else:
            ax.plot(steps, [r[key] for r in curve], "o-", color="C0", label="FFF-VDI (validation)")
            ax.axhline(curve[0][key], color="C3", ls="--", label="untrained (step 0)")
            ax.axhline(classical[key], color="C2", ls="--", label="classical fill (temporal median)")
            if key == "hole_psnr_db":
                ceiling = statistics.fmean(r["vae_hole_psnr_db"] for r in curve)
                ax.axhline(ceiling, color="0.5", ls=":", label="VAE reconstruction (ceiling)")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['title']} ({results['card']})", fontsize=11)
    fig.tight_layout()
    png = results_path.with_suffix(".png")
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    log(f"plot: {png}")
    return png


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        plot(args.plot)
        return 0
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python bench/learning_curve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(args.work / "calls.jsonl", "a") as calls:  # a run that took several calls names each of them
        calls.write(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}) + "\n")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards, pipeline, run_dir = args.work / "shards", args.work / "pipeline", args.work / "run"
    base = [f"experiment={EXPERIMENT}", f"experiment.model.pretrained={pipeline}", f"experiment.data.shards={shards}",
            f"experiment.output_dir={run_dir}", f"experiment.trainer.seed={args.seed}", *args.override]
    experiment = compose_experiment(REPO / "configs", base)[0]  # as launch/train.py composes it

    prepare_shards(args, shards)
    autoencoder = prepare_pipeline(args, experiment, pipeline, device)
    plan = train(args, base, run_dir)
    log("classical fill: scoring the validation clips")
    classical = classical_fill_scores(experiment, pipeline, device)

    curve = read_jsonl(run_dir / "validation.jsonl")
    card, slug = card_slug(device, args.card)
    from fff_vdi.models import build_random_components

    unet_params = sum(p.numel() for p in build_random_components(args.model_config, meta=True).unet.parameters())
    d, t = experiment.data, experiment.trainer
    results = {
        "title": f"FFF-VDI '{args.model_config}' ({unet_params / 1e6:.0f}M UNet) from scratch on synthetic videos",
        "card": card,
        "command": command,
        "calls": [json.loads(line) for line in (args.work / "calls.jsonl").read_text().splitlines()],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "setup": {
            "videos": args.videos, "val_fraction": args.val_fraction, "video_frames": args.video_frames,
            "render_size": args.render_size, "clip": f"{d.num_frames} frames at {d.width}x{d.height}",
            "batch_size": d.batch_size, "masks": {"rectangles": d.masks.rectangles, "freeform": d.masks.freeform},
            "model_config": args.model_config, "unet_parameters": unet_params, "lr": experiment.optim.lr,
            "val_clips": t.val_clips, "val_sampler_steps": t.val_steps, "ewarp_flow": t.val_ewarp_flow,
            "raft_and_flow_completion": "real architectures, random weights",
            "overrides": args.override,
        },
        "autoencoder": autoencoder,
        "training": {**plan, "train_minutes": args.train_minutes},
        "curve": curve,
        "train_loss": loss_per_interval(read_jsonl(run_dir / "metrics.jsonl"), plan["validate_every"]),
        "references": {"untrained": curve[0], "classical_fill": classical},
        "wall_s": time.perf_counter() - start,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"learning_curve_{slug}.json"
    atomic_write_json(out, results)
    last = curve[-1]
    log(f"results: {out}")
    log(f"hole PSNR: untrained {curve[0]['hole_psnr_db']:.2f} dB, step {last['step']} {last['hole_psnr_db']:.2f} dB, "
        f"classical fill {classical['hole_psnr_db']:.2f} dB, VAE ceiling {last['vae_hole_psnr_db']:.2f} dB "
        f"({results['wall_s']:.0f} s in all)")
    plot(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
