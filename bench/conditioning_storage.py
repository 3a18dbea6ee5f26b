#!/usr/bin/env python
"""What each storage choice of the conditioning cache costs in disk and in error.

    python bench/conditioning_storage.py OVERRIDES... [--frames 8] [--out bench/results/conditioning_storage_<device>.json]

OVERRIDES are launch/train.py's, as for tools/precompute_conditioning.py (shards, resolution, frame
steps, networks, RAFT iterations). The first --frames frames of the split's first video are decoded
as the tool decodes them, and the frozen networks run in float32 (the reference: "online fp32").

Flows (both directions, every configured frame step), as a cache could hold them: at full resolution
in float32, float16 or bfloat16; resized to the latent grid (1/8) as the UNet resizes them for the
refiner (`--flow-resolution eighth`) in float32 or float16; or RAFT's own 1/8-grid estimate (before its
learned upsampling). The error is measured where the refiner consumes flows, the latent grid: `raw` on
the flows as cached (what the refiner sees outside the holes), `completed` after flow completion in a
rectangle mask of the training recipe (what it sees everywhere; a 1/8 cache is resized back to full
resolution for the completion network, as the reader does). End-point errors in full-resolution
pixels (mean, 99th percentile, max), with the reference's mean magnitude for scale.
Latents: the posterior's parameters in float16 or bfloat16 against float32, through the same noise
draw (relative to the latents' standard deviation). CLIP: the embedding's relative L2 error.
The yardstick in each section: the online path itself with the frozen networks in bfloat16 (the
trained recipe's frozen_dtype) against float32. Disk: GB per 1,000 frames from the format (records,
tar headers and padding), for this run's settings and for the paper's (512x256, frame steps [1, 2],
bfloat16 frozen networks, CLIP dimension 1024), and for a YouTube-VOS-sized set (95k frames at 6 fps
in 3,471 videos). With random weights (the tiny pipeline, svd_xt random) RAFT's flows and the
completion are meaningless as flows: the numbers then show the arithmetic of each choice only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fff_vdi.conditioning.format import DTYPES, RecordShapes, resize_flows  # noqa: E402
from fff_vdi.conditioning.frames import decoded_videos  # noqa: E402
from fff_vdi.config import REPO_ROOT, compose_experiment  # noqa: E402
from fff_vdi.data.loader import resolve_backend  # noqa: E402
from fff_vdi.data.masks import draw_mask, plan_mask  # noqa: E402
from fff_vdi.data.sampler import stream_rng  # noqa: E402
from fff_vdi.data.shards import ShardSet  # noqa: E402
from fff_vdi.models.components import build_components  # noqa: E402
from fff_vdi.models.encoders import encode_image_embedding, latent_moments, latents_from_moments  # noqa: E402
from fff_vdi.train.objective import FrozenConditioner  # noqa: E402

YTVOS_FRAMES, YTVOS_VIDEOS = 95_000, 3_471  # YouTube-VOS 2019 train at 6 fps
PAPER = {"height": 256, "width": 512, "embed_dim": 1024, "frozen_dtype": "bfloat16", "frame_steps": [1, 2]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="launch/train.py's Hydra overrides")
    p.add_argument("--frames", type=int, default=8, help="frames of the first video to measure on")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/conditioning_storage_<device>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- disk

def gb_per_1000_frames(height: int, width: int, embed_dim: int, frozen_dtype: str, steps: list[int], flow: str,
                       frames_per_video: float) -> float:
    """Bytes of the records of 1,000 frames in videos of `frames_per_video` frames, as tar members."""
    resolution, dtype = flow.split("_", 1)
    shapes = RecordShapes(height, width, embed_dim, DTYPES[frozen_dtype], DTYPES[dtype], resolution)
    flow_bytes = shapes.nbytes("flows")

    def member(nbytes: int) -> int:  # header block, data, padding to the block size
        return tarfile.BLOCKSIZE + nbytes + (-nbytes % tarfile.BLOCKSIZE)

    pairs_per_frame = sum(max(frames_per_video - s, 0) for s in steps) / frames_per_video
    per_frame = member(shapes.nbytes("moments")) + member(shapes.nbytes("embeds")) + pairs_per_frame * member(flow_bytes)
    return per_frame * 1000 / 1e9


FLOW_CHOICES = ["full_float32", "full_float16", "full_bfloat16", "eighth_float32", "eighth_float16"]


def disk_table(height, width, embed_dim, frozen_dtype, steps, frames_per_video) -> dict:
    return {choice: round(gb_per_1000_frames(height, width, embed_dim, frozen_dtype, steps, choice, frames_per_video), 4)
            for choice in FLOW_CHOICES}


# ------------------------------------------------------------------------------------------ errors

STORED = ["full_float32", "full_float16", "full_bfloat16", "eighth_bilinear_float32", "eighth_bilinear_float16",
          "eighth_raft_float32", "eighth_raft_float16"]


def stored(choice: str, full: torch.Tensor, raft_eighth: torch.Tensor) -> torch.Tensor:
    """Flows (..., 2, h, w) as a cache of `choice` holds them, back in float32: full resolution, the
    full-resolution flow resized to the latent grid (the cache's --flow-resolution eighth), or RAFT's own
    1/8-grid estimate; in the named dtype."""
    *kind, dtype = choice.split("_")
    grid = tuple(raft_eighth.shape[-2:])
    flows = {"full": full, "eighth_bilinear": resize_flows(full, grid), "eighth_raft": raft_eighth}["_".join(kind)]
    return flows.to(DTYPES[dtype]).float()


def endpoint_errors(x: torch.Tensor, reference: torch.Tensor) -> dict:
    epe = (x.float() - reference.float()).norm(dim=-3).flatten()
    return {"mean_px": float(epe.mean()), "p99_px": float(torch.quantile(epe[: 2**24], 0.99)), "max_px": float(epe.max())}


def flow_errors(raft32, raft16, completion, frames: torch.Tensor, steps: list[int], iters: int, mask_cfg, seed: int) -> dict:
    """`raw`: every pair of every frame step, at the refiner's grid. `completed`: the step-1 pairs as
    one clip, completed in a rectangle mask of the training recipe (a 1/8 cache is resized back to
    full resolution first, as the reader does), then at the refiner's grid."""
    t, _, h, w = frames.shape
    grid = (h // 8, w // 8)
    raw = {c: [] for c in STORED}
    reference, yard = [], []
    for step in steps:
        if t <= step:
            continue
        first, second = frames[:-step], frames[step:]
        pair = (torch.cat([first, second]), torch.cat([second, first]))
        full, raft_eighth = raft32(*pair, iters), raft32(*pair, iters, upsample=False)
        reference.append(resize_flows(full, grid))
        for choice in STORED:
            raw[choice].append(resize_flows(stored(choice, full, raft_eighth), grid))
        yard.append(resize_flows(raft16(*pair, iters), grid))
    reference = torch.cat(reference)

    mask = draw_mask(plan_mask(stream_rng(seed, 1), t, h, w, mask_cfg, False), h, w, frames.device)[None]
    clip = (torch.cat([frames[:-1], frames[1:]]), torch.cat([frames[1:], frames[:-1]]))
    full, raft_eighth = raft32(*clip, iters), raft32(*clip, iters, upsample=False)

    def completed(flows):  # (2(T-1), 2, H', W') both directions -> completed, at the refiner's grid
        forward, backward = resize_flows(flows, (h, w)).chunk(2)
        return torch.cat([resize_flows(f, grid) for f in completion(forward[None], backward[None], mask)])

    completed_reference = completed(full)
    return {
        "reference_mean_magnitude_px": float(reference.norm(dim=-3).mean()),
        "raw": {c: endpoint_errors(torch.cat(v), reference) for c, v in raw.items()},
        "yardstick_bfloat16_raft_raw": endpoint_errors(torch.cat(yard), reference),
        "completed": {"hole_share": float(mask.mean()),
                      "reference_mean_magnitude_px": float(completed_reference.norm(dim=-3).mean()),
                      **{c: endpoint_errors(completed(stored(c, full, raft_eighth)), completed_reference)
                         for c in STORED[1:]}},
    }


def latent_errors(vae32, vae16, frames: torch.Tensor, seed: int) -> dict:
    moments = latent_moments(vae32, frames[None])

    def sampled(m):
        return latents_from_moments(vae32, m.float(), sample=True, scaled=True,
                                    generator=torch.Generator(frames.device).manual_seed(seed))

    reference = sampled(moments)
    std = float(reference.std())

    def errors(x):
        d = (x - reference).abs()
        return {"rms_over_std": float(d.pow(2).mean().sqrt()) / std, "max_over_std": float(d.max()) / std}

    return {"latent_std": std, **{f"stored_{dt}": errors(sampled(moments.to(DTYPES[dt]))) for dt in ("float16", "bfloat16")},
            "yardstick_bfloat16_vae": errors(sampled(latent_moments(vae16, frames[None])))}


def embed_errors(n32: FrozenConditioner, n16: FrozenConditioner, frames: torch.Tensor) -> dict:
    reference = encode_image_embedding(n32.image_encoder, n32.feature_extractor, frames).float()

    def rel(x):
        return float((x.float() - reference).norm() / reference.norm())

    return {**{f"stored_{dt}_relative_l2": rel(reference.to(DTYPES[dt])) for dt in ("float16", "bfloat16")},
            "yardstick_bfloat16_clip_relative_l2": rel(encode_image_embedding(n16.image_encoder, n16.feature_extractor, frames))}


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = compose_experiment(REPO_ROOT / "configs", args.overrides)[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, m = cfg.data, cfg.model
    shards = ShardSet.open(d.shards, d.split)
    video = shards.videos[0]
    frames = next(decoded_videos(shards, [video], d, resolve_backend(d.backend, device), device))[: args.frames]
    tick = time.perf_counter()
    n32 = FrozenConditioner(build_components(m, seed=cfg.trainer.seed, device=device), cfg.objective, m.raft_iters, torch.float32, device)
    n16 = FrozenConditioner(build_components(m, seed=cfg.trainer.seed, device=device), cfg.objective, m.raft_iters, torch.bfloat16, device)
    with torch.inference_mode():
        flows = flow_errors(n32.raft, n16.raft, n32.flow_completion, frames, sorted(set(d.frame_steps)), m.raft_iters,
                            d.masks, cfg.trainer.seed)
        latents = latent_errors(n32.vae, n16.vae, frames, cfg.trainer.seed)
        embeds = embed_errors(n32, n16, frames)
    embed_dim = n32.image_encoder.config.projection_dim
    per_video = YTVOS_FRAMES / YTVOS_VIDEOS
    paper = disk_table(PAPER["height"], PAPER["width"], PAPER["embed_dim"], PAPER["frozen_dtype"], PAPER["frame_steps"], per_video)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "weights": m.random_init and f"random ({m.random_init})" or m.pretrained,
        "random_weights_note": "random RAFT/flow-completion weights give meaningless flows: the errors show each "
                               "choice's arithmetic, not its effect on real flows" if m.random_init or "tiny" in str(m.pretrained) else None,
        "video": video.video_id, "frames": int(frames.shape[0]), "height": d.height, "width": d.width,
        "frame_steps": sorted(set(d.frame_steps)), "raft_iters": m.raft_iters, "seconds": time.perf_counter() - tick,
        "flows": flows, "latents": latents, "clip": embeds,
        "disk_gb_per_1000_frames_this_run": disk_table(d.height, d.width, embed_dim, m.frozen_dtype, sorted(set(d.frame_steps)), per_video),
        "disk_gb_per_1000_frames_paper_512x256": paper,
        "youtube_vos_6fps_gb": {c: round(v * YTVOS_FRAMES / 1000, 1) for c, v in paper.items()},
        "youtube_vos": {"frames": YTVOS_FRAMES, "videos": YTVOS_VIDEOS, "frames_per_video": round(per_video, 2),
                        "frame_steps": PAPER["frame_steps"]},
    }
    out = args.out or Path(__file__).parent / "results" / f"conditioning_storage_{'cpu' if device.type == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
