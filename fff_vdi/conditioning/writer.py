"""Write a conditioning cache (fff_vdi.conditioning.format) for the image shards of an experiment.

The experiment's configuration says everything that shapes the cache: the image shards and split,
the resolution, the frame steps (with the window length and the short-video policy, which decide the
steps each video's clips can take), the frozen networks, their dtype and RAFT's iterations, the
decode backend. The videos of the split are cut into work units of consecutive videos (at least
`unit_frames` frames each); rank r of a torchrun world does units r, r + W, r + 2W, ... Each unit
is one tar and its index, written to temporary names and renamed, the index last; `manifest.json`
comes once every unit is in place. After a kill at any moment, --resume keeps the units whose index
was renamed (and whose tar matches it) and redoes the others: every unit is a pure function of its
frames and the networks (deterministic algorithms), so the result is byte-identical to an
uninterrupted run, on any number of ranks.
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import fff_vdi
from fff_vdi.conditioning.compute import FrameEncoder, network_fingerprints
from fff_vdi.conditioning.format import (
    FORMAT,
    INDEX_FORMAT,
    MANIFEST_NAME,
    RUN_NAME,
    TOOL,
    VERSION,
    describe_shard_change,
    embed_member,
    flows_member,
    image_shard_identity,
    load_manifest,
    moments_member,
    read_json,
    record_bytes,
    resize_flows,
    unit_index_name,
    unit_name,
)
from fff_vdi.conditioning.frames import decoded_videos
from fff_vdi.config import ExperimentConfig, validate_data
from fff_vdi.data.loader import resolve_backend
from fff_vdi.data.plan import steps_in_use
from fff_vdi.data.shards import ShardSet, VideoEntry
from fff_vdi.data.shards import load_manifest as load_image_manifest
from fff_vdi.distributed.env import DistInfo, barrier
from fff_vdi.errors import DataError, InputError
from fff_vdi.models.components import build_components
from fff_vdi.sharder.manifest import sha256_file
from fff_vdi.sharder.spool import Spool
from fff_vdi.sharder.tarpack import Member, TarShardWriter, pack_members
from fff_vdi.sharder.writer import crash_point
from fff_vdi.train.objective import DTYPES, FrozenConditioner
from fff_vdi.utils.atomic import atomic_open, atomic_write_json, remove_temp_files
from fff_vdi.utils.paths import unwritable_reason

FLOW_DTYPES = ("float32", "float16")
FLOW_RESOLUTIONS = ("full", "eighth")
UNIT_FILE = re.compile(r"cond-\d{6}\.(tar|index\.json)")
FRESH, RESUMING, FINISHED = "fresh", "resuming", "finished"


@dataclass(frozen=True)
class PrecomputeOptions:
    out: Path
    unit_frames: int = 128
    flow_dtype: str = "float32"
    pairs_per_call: int = 16
    resume: bool = False
    flow_resolution: str = "full"

    def validate(self) -> None:
        if self.unit_frames < 1:
            raise InputError(f"--unit-frames={self.unit_frames}: use 1 or more")
        if self.flow_dtype not in FLOW_DTYPES:
            raise InputError(f"--flow-dtype={self.flow_dtype}: use one of {', '.join(FLOW_DTYPES)}")
        if self.flow_resolution not in FLOW_RESOLUTIONS:
            raise InputError(f"--flow-resolution={self.flow_resolution}: use one of {', '.join(FLOW_RESOLUTIONS)}")
        if self.pairs_per_call < 1:
            raise InputError(f"--pairs-per-call={self.pairs_per_call}: use 1 or more")


def plan_units(videos: list[VideoEntry], unit_frames: int) -> list[list[int]]:
    """Consecutive videos in groups of at least `unit_frames` frames (the last group may have fewer)."""
    units, current, frames = [], [], 0
    for i, video in enumerate(videos):
        current.append(i)
        frames += video.num_frames
        if frames >= unit_frames:
            units.append(current)
            current, frames = [], 0
    return units + [current] if current else units


def output_args(cfg: ExperimentConfig, options: PrecomputeOptions, image_manifest: dict, backend: str,
                networks: dict[str, str], embed_dim: int) -> dict:
    """Everything that shapes the cache's bytes: recorded in run.json and the manifest, compared on
    --resume, and checked by the trainer against its configuration."""
    d, m = cfg.data, cfg.model
    return {
        "split": d.split, "height": d.height, "width": d.width, "frame_steps": sorted(set(d.frame_steps)),
        "num_frames": d.num_frames, "short_video_policy": d.short_video_policy, "raft_iters": m.raft_iters,
        "frozen_dtype": m.frozen_dtype, "flow_dtype": options.flow_dtype,
        "flow_resolution": options.flow_resolution, "embed_dim": embed_dim,
        "decode_backend": backend, "unit_frames": options.unit_frames,
        "image_shards": {"split": d.split, "shards": image_shard_identity(image_manifest, d.split)},
        "networks": networks,
    }


def check_output_folder(out: Path, resume: bool) -> bool:
    """Whether `out` holds a run of this tool; raises InputError when it may not be used as asked
    (checked before the networks are built, so a wrong folder is refused at once)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pick a folder")
    problem = unwritable_reason(out)
    if problem:
        raise InputError(f"--out {out}: {problem}; pick a folder you can write")
    names = sorted(p.name for p in out.iterdir() if ".tmp-" not in p.name) if out.is_dir() else []
    if not names:
        return False
    foreign = [n for n in names if n not in (MANIFEST_NAME, RUN_NAME) and not UNIT_FILE.fullmatch(n)]
    if foreign:
        raise InputError(f"--out {out} holds files this tool did not write ({', '.join(foreign[:5])}); pick an empty folder")
    finished = MANIFEST_NAME in names
    if not resume:
        raise InputError(f"--out {out} already holds " + (
            "a finished cache; pass --resume to check it is complete, or pick an empty folder" if finished else
            "an unfinished cache; pass --resume to finish it, or pick an empty folder"))
    if not finished and RUN_NAME not in names:
        raise InputError(f"--out {out} holds units but no {RUN_NAME}, so it cannot be resumed; pick an empty folder")
    return True


def output_state(out: Path, args: dict, resume: bool) -> str:
    """FRESH, RESUMING or FINISHED; raises InputError / DataError when `out` may not be used as asked."""
    if not check_output_folder(out, resume):
        return FRESH
    finished = (out / MANIFEST_NAME).is_file()
    recorded = load_manifest(out)["args"] if finished else read_json(out / RUN_NAME, "the run's arguments")["args"]
    if recorded.get("image_shards") != args["image_shards"]:
        raise DataError(f"--resume: the image shards changed since {out} was started "
                        f"({describe_shard_change(recorded['image_shards']['shards'], args['image_shards']['shards'])})"
                        "; pick an empty folder to build a cache of the shards as they are now")
    changed = [f"{k}: {recorded.get(k)!r} then, {v!r} now" for k, v in args.items() if recorded.get(k) != v]
    if changed:
        raise InputError(f"--resume: {out} was made with other settings ({'; '.join(changed)}); rerun with the same "
                         "configuration, or pick an empty folder")
    return FINISHED if finished else RESUMING


def unit_is_finished(out: Path, name: str) -> bool:
    """The unit's index was renamed into place and describes the tar beside it."""
    tar, index = out / name, out / unit_index_name(name)
    if not (tar.is_file() and index.is_file()):
        return False
    loaded = read_json(index, f"the index of {name}")
    return loaded.get("unit") == name and loaded.get("bytes") == tar.stat().st_size


@dataclass
class UnitRecords:
    """A unit's conditioning on the host, ready to be written: per frame the latent moments and the
    CLIP embedding (in the order of the unit's frames), per frame step the flows of every pair in video
    then frame order (the order the records take them), and the steps each video uses."""
    moments: torch.Tensor
    embeds: torch.Tensor
    flows: dict[int, torch.Tensor]
    steps: list[set[int]]


class UnitWriter:
    """Computes the records of units of videos and writes each unit's tar and index.

    The writing (serialising, crc32s, the tar, fsync, the index) runs on a background thread while the
    next unit computes: it took 28% of the build's time on one H200 when done in turn. One unit is in
    flight at a time, so the host holds at most two units' records, and a write's error stops the build
    at the next unit, in order. Every unit is written whole and renamed into place as before, so a kill
    at any moment resumes to the same bytes."""

    def __init__(self, out: Path, shards: ShardSet, cfg: ExperimentConfig, args: dict, encoder: FrameEncoder,
                 backend: str, device: torch.device):
        self.out, self.shards, self.cfg, self.args = out, shards, cfg, args
        self.encoder, self.backend, self.device = encoder, backend, device
        self.frozen_dtype, self.flow_dtype = DTYPES[args["frozen_dtype"]], DTYPES[args["flow_dtype"]]
        # Main thread: decode, vae, clip, raft, copy (to the host), write_wait (for the unit before's
        # write); the writer thread, alongside: write.
        self.seconds = {"decode": 0.0, "vae": 0.0, "clip": 0.0, "raft": 0.0, "copy": 0.0, "write_wait": 0.0,
                        "write": 0.0}
        self.units: list[tuple[int, float]] = []  # (frames, seconds) of each unit, in order

    def _tick(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def write_units(self, units: list[tuple[str, list[VideoEntry]]], progress: "Progress") -> None:
        frames_iter = decoded_videos(self.shards, [v for _, videos in units for v in videos], self.cfg.data,
                                     self.backend, self.device)
        in_flight = None  # (the write's future, the unit's frames)
        mark = time.perf_counter()  # a unit's time runs from the hand-over of the one before

        def finish_in_flight() -> None:
            future, frames = in_flight
            tick = time.perf_counter()
            future.result()  # the write's error, if any, here
            self.seconds["write_wait"] += time.perf_counter() - tick
            progress.update(frames)

        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer") as writer:
                for name, videos in units:
                    tick = self._tick()
                    frames = [next(frames_iter) for _ in videos]
                    self._account("decode", tick)
                    records = self._compute_unit(videos, frames)
                    if in_flight is not None:
                        finish_in_flight()
                    in_flight = (writer.submit(self._write_unit, name, videos, records), sum(v.num_frames for v in videos))
                    self.units.append((in_flight[1], time.perf_counter() - mark))
                    mark = time.perf_counter()
                if in_flight is not None:
                    finish_in_flight()
                    self.units[-1] = (self.units[-1][0], self.units[-1][1] + time.perf_counter() - mark)
        finally:
            frames_iter.close()

    def _compute_unit(self, videos: list[VideoEntry], frames: list[torch.Tensor]) -> UnitRecords:
        tick = self._tick()
        starts = [0]
        for f in frames:
            starts.append(starts[-1] + len(f))
        everything = torch.cat(frames)
        moments = self.encoder.moments(everything)
        tick = self._account("vae", tick)
        embeds = self.encoder.embeds(everything)
        tick = self._account("clip", tick)
        steps = [steps_in_use(v.num_frames, self.cfg.data) for v in videos]
        flows = {}
        for step in sorted(set().union(*steps)):
            pairs = [(starts[k] + i, starts[k] + i + step) for k, v in enumerate(videos) if step in steps[k]
                     for i in range(v.num_frames - step)]
            if pairs:
                sources, targets = torch.tensor(pairs, device=self.device).unbind(1)
                computed = self.encoder.flows(everything, sources, targets)
                if self.args["flow_resolution"] == "eighth":
                    computed = resize_flows(computed, (self.args["height"] // 8, self.args["width"] // 8))
                flows[step] = computed
        tick = self._account("raft", tick)
        records = UnitRecords(moments.cpu(), embeds.cpu(), {s: f.cpu() for s, f in flows.items()}, steps)
        self._account("copy", tick)
        return records

    def _write_unit(self, name: str, videos: list[VideoEntry], records: UnitRecords) -> None:
        """On the writer thread: the unit's members, its tar and its index."""
        tick = time.perf_counter()
        flows = {s: iter(f) for s, f in records.flows.items()}
        members, layout, first = [], [], 0
        for video, steps in zip(videos, records.steps):
            frames_of = range(first, first + video.num_frames)
            first += video.num_frames
            entry = {"moments": [moments_member(video.key, i) for i in range(video.num_frames)],
                     "embeds": [embed_member(video.key, i) for i in range(video.num_frames)],
                     "flows": {s: [flows_member(video.key, s, i) for i in range(video.num_frames - s)]
                               for s in sorted(steps)}}
            members += [Member(n, record_bytes(records.moments[g], self.frozen_dtype))
                        for n, g in zip(entry["moments"], frames_of)]
            members += [Member(n, record_bytes(records.embeds[g], self.frozen_dtype))
                        for n, g in zip(entry["embeds"], frames_of)]
            for s, names in entry["flows"].items():
                members += [Member(n, record_bytes(next(flows[s]), self.flow_dtype)) for n in names]
            layout.append((video, entry))
        self._write(name, members, layout)
        self.seconds["write"] += time.perf_counter() - tick

    def _account(self, phase: str, tick: float) -> float:
        now = self._tick()
        self.seconds[phase] += now - tick
        return now

    def _write(self, name: str, members: list[Member], layout: list) -> None:
        packed = pack_members(members, Spool(None, os.getpid()))  # in memory: this process writes them
        with atomic_open(self.out / name) as file:
            tar = TarShardWriter(file)
            try:
                start = tar.append(packed)
                size = tar.close()
            finally:
                tar.stop()
        crash_point("unit-tar-written")

        def where(member: str) -> list[int]:
            offset, length, crc = packed.where[member]
            return [start + offset, length, crc]

        videos = [{"shard": video.shard, "key": video.key, "video_id": video.video_id, "num_frames": video.num_frames,
                   "moments": [where(n) for n in entry["moments"]], "embeds": [where(n) for n in entry["embeds"]],
                   "flows": {str(s): [where(n) for n in names] for s, names in entry["flows"].items()}}
                  for video, entry in layout]
        index = {"format": INDEX_FORMAT, "version": VERSION, "unit": name, "bytes": size,
                 "sha256": tar.sha256.hexdigest(), "videos": videos}
        atomic_write_json(self.out / unit_index_name(name), index, indent=None)
        crash_point("unit-written")


class Progress:
    """tqdm bar over this rank's frames, with frames/s."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, disable=not enabled, smoothing=0.1,
                        mininterval=0.5 if sys.stderr.isatty() else 30)
        self.start, self.frames = time.perf_counter(), 0

    def update(self, frames: int) -> None:
        self.frames += frames
        self.bar.set_postfix_str(f"{self.frames / max(time.perf_counter() - self.start, 1e-9):.1f} frames/s",
                                 refresh=False)
        self.bar.update(frames)

    def close(self) -> None:
        self.bar.close()


@dataclass
class PrecomputeSummary:
    out: Path
    state: str
    frames: int = 0  # computed by this rank in this run
    seconds: float = 0.0
    phases: dict | None = None
    units: list | None = None  # (frames, seconds) per unit: the first one includes compilation
    manifest: dict | None = None


def run_precompute(cfg: ExperimentConfig, options: PrecomputeOptions, dist: DistInfo) -> PrecomputeSummary:
    """Build (or, with options.resume, finish) the cache of `cfg`'s image shards in options.out: this
    rank's units, then, on rank 0 once every rank is done, the manifest."""
    from fff_vdi.train.trainer import set_determinism

    options.validate()
    validate_data(cfg.data, "experiment.data")
    out, device = options.out, dist.device
    check_output_folder(out, options.resume)
    shards = ShardSet.open(cfg.data.shards, cfg.data.split, verify_crc=cfg.data.verify_crc)
    image_manifest = load_image_manifest(Path(cfg.data.shards))
    backend = resolve_backend(cfg.data.backend, device)
    set_determinism(cfg.trainer.seed, deterministic=True)  # the same bytes on every run, and on resume
    components = build_components(cfg.model, seed=cfg.trainer.seed, device=device)
    dtype = DTYPES[cfg.model.frozen_dtype]
    networks = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters, dtype, device)
    args = output_args(cfg, options, image_manifest, backend, network_fingerprints(components, dtype),
                       components.image_encoder.config.projection_dim)
    state = output_state(out, args, options.resume)
    if state == FINISHED:
        if dist.is_main:
            print(f"{out} is already finished with these settings; nothing to do (run {TOOL} --verify {out} to check it)")
        return PrecomputeSummary(out, state)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)  # left by a killed run; no rank writes before the barrier below
        if state == FRESH:
            atomic_write_json(out / RUN_NAME, {"tool": TOOL, "tool_version": fff_vdi.__version__, "args": args})
    barrier()
    if cfg.parallel.compile_frozen:
        networks.compile()
    encoder = FrameEncoder(networks, pairs_per_call=options.pairs_per_call, static_shapes=cfg.parallel.compile_frozen)
    units = [(unit_name(n), [shards.videos[i] for i in unit]) for n, unit in enumerate(plan_units(shards.videos, options.unit_frames))]
    mine = [(name, videos) for n, (name, videos) in enumerate(units)
            if n % dist.world_size == dist.rank and not unit_is_finished(out, name)]
    if state == RESUMING and dist.is_main:
        print(f"resume: {len(units) - len(mine)} of {len(units)} units finished or on other ranks; {len(mine)} to do here")
    writer = UnitWriter(out, shards, cfg, args, encoder, backend, device)
    progress = Progress(sum(v.num_frames for _, videos in mine for v in videos), enabled=dist.is_main)
    try:
        writer.write_units(mine, progress)
    finally:
        progress.close()
    summary = PrecomputeSummary(out, state, progress.frames, time.perf_counter() - progress.start, writer.seconds,
                                writer.units)
    barrier()
    if dist.is_main:
        summary.manifest = build_manifest(out, args, [name for name, _ in units], cfg.data.shards)
        atomic_write_json(out / MANIFEST_NAME, summary.manifest)
        crash_point("manifest-written")
    barrier()
    return summary


def build_manifest(out: Path, args: dict, names: list[str], image_root: str) -> dict:
    units = []
    for name in names:
        if not unit_is_finished(out, name):
            raise DataError(f"{out / name}: unit missing after every rank finished (a rank failed?); rerun with --resume")
        index = read_json(out / unit_index_name(name), f"the index of {name}")
        units.append({"name": name, "index": unit_index_name(name), "sha256": index["sha256"], "bytes": index["bytes"],
                      "index_sha256": sha256_file(out / unit_index_name(name)), "videos": len(index["videos"]),
                      "frames": sum(v["num_frames"] for v in index["videos"])})
    return {"format": FORMAT, "version": VERSION, "tool": TOOL, "tool_version": fff_vdi.__version__, "args": args,
            "image_shards_root": str(Path(image_root).resolve()), "units": units,
            "totals": {"units": len(units), "videos": sum(u["videos"] for u in units),
                       "frames": sum(u["frames"] for u in units), "bytes": sum(u["bytes"] for u in units)}}
