"""The precomputed conditioning cache: tools/precompute_conditioning.py (a full disk, kill -9 and resume to the same
bytes, --verify), the trainer's refusal of what a cache cannot serve, and equivalence with the online
conditioning (the same tensors and losses for the same seeds, also across a resume).

CPU, the tiny pipeline (RAFT and flow completion at full architecture, random weights), three tiny
synthetic videos at 128x128: two of 5 frames and one of 2, which a 3-frame window with
short_video_policy=reflect_pad plays back and forth (its second pair is read from the cache swapped).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, snapshot
from fff_vdi.conditioning.format import resize_flows
from fff_vdi.conditioning.reader import ConditioningCache, open_training_cache
from fff_vdi.conditioning.verify import verify_cache
from fff_vdi.conditioning.writer import PrecomputeOptions, check_output_folder, run_precompute
from fff_vdi.config import compose_experiment
from fff_vdi.data.loader import ClipLoader
from fff_vdi.sharder.options import ShardOptions
from fff_vdi.sharder.run import run_sharding
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.distributed.env import DistInfo
from fff_vdi.errors import ConfigError, DataError, InputError
from fff_vdi.models.components import build_random_components, load_components
from fff_vdi.train.objective import CLEAN_FEATURES, FrozenConditioner, edm_loss, step_generator
from test_train import launch_together, losses

TOOL = REPO / "tools" / "precompute_conditioning.py"
TOOL_FLAGS = ["--unit-frames", "2"]  # one unit per video: 3 units


def compose(overrides: list[str]):
    """The validated experiment launch/train.py would train with `overrides`."""
    return compose_experiment(REPO / "configs", overrides)[0]


def experiment(pipeline: Path, shards: Path, **extra) -> list[str]:
    base = {"experiment": "tiny_cpu", "experiment.model.pretrained": pipeline, "experiment.model.raft_iters": 1,
            "experiment.data.shards": shards, "experiment.data.num_frames": 3, "experiment.data.height": 128,
            "experiment.data.width": 128, "experiment.data.frame_steps": "[1,2]",
            "experiment.data.short_video_policy": "reflect_pad", "experiment.data.crop": "none",
            "experiment.data.hflip_prob": 0, "experiment.data.num_workers": 0, "experiment.trainer.validate_every": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tool(*args, env: dict | None = None, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """tools/precompute_conditioning.py run as a user runs it; the exit status is the test's to check.
    With `limit_file_size`, writes beyond that many bytes fail with EFBIG (as on a full disk)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600,
                          preexec_fn=limit if limit_file_size else None)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cond_data")
    src = write_synthetic_videos(root / "src", num_videos=2, num_frames=5, height=96, width=160, seed=5,
                                 with_annotations=False)
    short = write_synthetic_videos(root / "short", num_videos=1, num_frames=2, height=96, width=160, seed=6,
                                   with_annotations=False)
    (short / "JPEGImages" / "synth0000").rename(src / "JPEGImages" / "short0000")
    run_sharding(ShardOptions(src=src, out=root / "shards"))
    return root / "shards"


def precompute_here(out: Path, pipeline: Path, shards: Path, **options) -> dict:
    """A cache made in this process (no process group: a world of one); returns its manifest."""
    cfg = compose(experiment(pipeline, shards))
    try:
        summary = run_precompute(cfg, PrecomputeOptions(out, unit_frames=2, **options), DistInfo(0, 1, 0, torch.device("cpu")))
    finally:
        torch.use_deterministic_algorithms(False)  # the tool's setting, for this process only
    return summary.manifest


@pytest.fixture(scope="module")
def reference(tiny_pipeline, image_shards, tmp_path_factory) -> Path:
    """The exact cache, uninterrupted."""
    out = tmp_path_factory.mktemp("cache") / "reference"
    totals = precompute_here(out, tiny_pipeline, image_shards)["totals"]
    assert (totals["units"], totals["videos"], totals["frames"]) == (3, 3, 12)
    return out


@pytest.mark.slow
def test_full_disk_then_kill_9_then_resume_is_byte_identical(tiny_pipeline, image_shards, reference, tmp_path):
    """A full disk stops the first run with one line naming the folder; killed once the second unit's tar
    is in place but before its index, --resume keeps unit 0, redoes unit 1 and does unit 2; every file
    equals the uninterrupted run's."""
    out = tmp_path / "out"
    args = ["--out", out, *TOOL_FLAGS, *experiment(tiny_pipeline, image_shards)]
    full = tool(*args, limit_file_size=100_000)  # run.json fits, the first unit's tar (~1 MB) does not
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{out}: File too large; fix that" in errors[0], full.stderr
    assert "rerun with --resume" in errors[0] and sorted(p.name for p in out.iterdir()) == ["run.json"]
    killed = tool(*args, "--resume", env={"FFF_VDI_SHARD_CRASH_AT": "unit-tar-written:2"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "cond-000000.index.json").is_file() and not (out / "manifest.json").exists()
    with pytest.raises(InputError, match="pass --resume to finish it"):  # without --resume, before any work
        check_output_folder(out, resume=False)
    resumed = tool(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: 1 of 3 units finished" in resumed.stdout
    assert snapshot(out) == snapshot(reference)


def trainers_together(runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Single-process training runs side by side; their exit statuses are the test's to check."""
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               "launch/train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for args in runs]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _tool_main():
    spec = importlib.util.spec_from_file_location("precompute_conditioning", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_verify_passes_the_cache_and_names_a_corrupted_record(reference, tmp_path, capsys):
    main = _tool_main()
    assert main(["--verify", str(reference)]) == 0
    assert "verify: OK" in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    index = json.loads((damaged / "cond-000001.index.json").read_text())  # synth0000
    offset, size, _ = index["videos"][0]["flows"]["2"][1]
    with open(damaged / "cond-000001.tar", "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    problems = verify_cache(damaged).problems
    assert any("cond-000001.tar: record synth0000.s02.f00001.flows: crc32" in p and "differs from the index's" in p
               for p in problems), problems
    assert main(["--verify", str(damaged)]) == 1
    # The trainer's reader refuses the damaged record too, naming it.
    cache = ConditioningCache.open(damaged)
    cache.clip_records("train-000000.tar", "synth0000", (0, 2))
    with pytest.raises(DataError, match="synth0000.s02.f00001.flows fails its crc32"):
        cache.clip_records("train-000000.tar", "synth0000", (1, 3))


def test_refusals_name_the_key(tiny_pipeline, image_shards, reference, tmp_path):
    def refused(**extra) -> str:
        with pytest.raises(ConfigError) as e:  # at composition (validate) or when the cache is opened
            open_training_cache(compose(experiment(tiny_pipeline, image_shards, **{
                "experiment.data.conditioning": reference, **extra})), "cpu")
        assert "\n" not in str(e.value)
        return e.value.key

    assert refused(**{"experiment.data.crop": "random"}) == "experiment.data.crop"
    assert refused(**{"experiment.data.hflip_prob": 0.5}) == "experiment.data.hflip_prob"
    assert refused(**{"experiment.data.color_jitter.enabled": "true"}) == "experiment.data.color_jitter.enabled"
    assert refused(**{"experiment.data.height": 256}) == "experiment.data.height"
    assert refused(**{"experiment.model.raft_iters": 2}) == "experiment.model.raft_iters"
    assert refused(**{"experiment.model.frozen_dtype": "bfloat16"}) == "experiment.model.frozen_dtype"
    # A 2-frame window at step 3 fits a 5-frame video: no flows for step 3 in the cache.
    assert refused(**{"experiment.data.num_frames": 2, "experiment.data.frame_steps": "[3]"}) == "experiment.data.frame_steps"
    # A 4-frame window in a 5-frame video takes step 1 where step 2 is drawn: cached. A 6-frame window
    # reflects in every video at step 1: cached too.
    for ok in ({"experiment.data.num_frames": 4}, {"experiment.data.num_frames": 6}):
        cfg = compose(experiment(tiny_pipeline, image_shards, **{"experiment.data.conditioning": reference, **ok}))
        open_training_cache(cfg, "cpu")
    changed = tmp_path / "shards"
    shutil.copytree(image_shards, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (changed / "manifest.json").write_text(json.dumps(manifest))
    cfg = compose(experiment(tiny_pipeline, changed, **{"experiment.data.conditioning": reference}))
    with pytest.raises(ConfigError, match=r"the image shards changed since .*\(train-000000.tar has sha256 000000000000"):
        open_training_cache(cfg, "cpu")
    cfg = compose(experiment(tiny_pipeline, image_shards, **{"experiment.data.conditioning": reference}))
    cache = open_training_cache(cfg, "cpu")
    with pytest.raises(ConfigError, match="experiment.model.pretrained.*vae_encoder weights"):
        cache.check_networks(build_random_components("tiny", seed=1), cfg)
    assert refused(**{"experiment.model.flow_scale": 0.5}) == "experiment.model.flow_scale"


def test_cached_conditioning_equals_the_online_one(tiny_pipeline, image_shards, reference):
    """Batch by batch, the conditioner gives the same tensors from the cache's features as online, for
    the same generator: the clean latents exactly (the same draws from the same posterior parameters),
    hence every later draw too."""
    cfg = compose(experiment(tiny_pipeline, image_shards, **{
        "experiment.data.conditioning": reference, "experiment.data.batch_size": 2}))
    cpu = torch.device("cpu")
    cache = open_training_cache(cfg, "cpu")
    components = load_components(str(tiny_pipeline))
    cache.check_networks(components, cfg)
    conditioner = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters, torch.float32, cpu)
    with_cache, without = ClipLoader(cfg.data, conditioning=cache), ClipLoader(replace(cfg.data, conditioning=None))
    reflected = 0
    for step in range(3):
        a, b = next(with_cache), next(without)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert CLEAN_FEATURES in a and CLEAN_FEATURES not in b
        reflected += sum(idx[2] < idx[1] for idx in a["frame_indices"].tolist())
        x = conditioner(a, step_generator(7, 0, step, 0, cpu))
        y = conditioner(b, step_generator(7, 0, step, 0, cpu))
        for name in ("latents", "cond_latents", "cond_sigma"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        for name in ("image_embeds", "flows_forward", "flows_backward"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-5, atol=1e-5)
        loss_x = edm_loss(components.unet, x, cfg.objective, step_generator(7, 0, step, 1, cpu), torch.float32)
        loss_y = edm_loss(components.unet, y, cfg.objective, step_generator(7, 0, step, 1, cpu), torch.float32)
        torch.testing.assert_close(loss_x, loss_y, rtol=1e-5, atol=0)
    assert reflected > 0  # a pair read swapped from the cache was compared


@pytest.mark.slow
def test_training_with_the_cache_matches_online_and_resumes_exactly(tiny_pipeline, image_shards, reference, tmp_path):
    """launch/train.py with and without the cache, same seeds: per-step losses within float tolerance;
    the cached run ended at step 1 and resumed to step 2 gives step 2 as the uninterrupted online run. And a
    setting the cache cannot serve stops the run at start-up with one line naming the key."""
    common = {"experiment.trainer.max_steps": 2, "experiment.trainer.checkpoint_every": 1,
              "experiment.trainer.validate_every": 0, "experiment.trainer.export_at_end": "false",
              "experiment.trainer.progress_bar": "false", "experiment.trainer.deterministic": "true"}
    online, cached = tmp_path / "online", tmp_path / "cached"
    launch_together([
        experiment(tiny_pipeline, image_shards, **common, **{"experiment.output_dir": online}),
        experiment(tiny_pipeline, image_shards, **{**common, "experiment.output_dir": cached,
                                                   "experiment.data.conditioning": reference,
                                                   "experiment.trainer.max_steps": 1}),
    ])
    resumed, bad = trainers_together([
        experiment(tiny_pipeline, image_shards, **common, **{"experiment.output_dir": cached,
                                                             "experiment.data.conditioning": reference}),
        experiment(tiny_pipeline, image_shards, **common, **{"experiment.output_dir": tmp_path / "bad",
                                                             "experiment.data.conditioning": reference,
                                                             "experiment.model.raft_iters": 3}),
    ])
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert "resumed from" in resumed.stdout and "conditioning from the cache" in resumed.stdout
    expected, got = losses(online), losses(cached)
    assert sorted(got) == sorted(expected) == [1, 2]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
    assert bad.returncode != 0
    assert "error: config key 'experiment.model.raft_iters' = 3: the conditioning cache" in bad.stdout
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_approximate_cache_is_refused_unless_asked_for_and_reads_as_stated(tiny_pipeline, image_shards, tmp_path):
    """Flows in float16 on the latent grid: refused without the named approximations; with them, the
    batch's raw flows are RAFT's resized to the latent grid, rounded to float16 and resized back."""
    out = tmp_path / "approximate"
    precompute_here(out, tiny_pipeline, image_shards, flow_dtype="float16", flow_resolution="eighth")
    assert verify_cache(out).problems == []
    overrides = {"experiment.data.conditioning": out}
    for asked, missing in (("[]", "flows_float16"), ("[flows_float16]", "flows_eighth")):
        cfg = compose(experiment(tiny_pipeline, image_shards, **overrides,
                                            **{"experiment.data.conditioning_approximate": asked}))
        with pytest.raises(ConfigError, match=rf"conditioning_approximate.*\[{missing}\]"):
            open_training_cache(cfg, "cpu")
    cfg = compose(experiment(tiny_pipeline, image_shards, **overrides, **{
        "experiment.data.conditioning_approximate": "[flows_float16,flows_eighth]"}))
    cache = open_training_cache(cfg, "cpu")
    components = load_components(str(tiny_pipeline))
    conditioner = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters, torch.float32, torch.device("cpu"))
    batch = next(ClipLoader(cfg.data, conditioning=cache))
    features = batch[CLEAN_FEATURES]
    online = conditioner.raw_flows(batch["pixel_values"])
    for got, flows in zip((features.raw_flows_forward, features.raw_flows_backward), online):
        expected = resize_flows(resize_flows(flows, (16, 16)).half(), (128, 128))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert conditioner(batch, step_generator(7, 0, 0, 0, torch.device("cpu"))).flows_forward.shape == online[0].shape


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)"))])
def test_dali_delivers_the_same_records_as_the_cpu_backend(tiny_pipeline, image_shards, reference, device):
    """The DALI graph carries the cache's records as extra outputs (on the GPU: copied there as whole
    batches); the features equal the PIL backend's bit for bit."""
    pytest.importorskip("nvidia.dali")
    cfg = compose(experiment(tiny_pipeline, image_shards, **{
        "experiment.data.conditioning": reference, "experiment.data.batch_size": 2, "experiment.data.num_workers": 1}))
    cache = ConditioningCache.open(reference)
    pil = ClipLoader(cfg.data, conditioning=cache, backend="cpu")
    dali = ClipLoader(cfg.data, device=device, conditioning=cache, backend="dali")
    for _ in range(2):
        x, y = next(pil)[CLEAN_FEATURES], next(dali)[CLEAN_FEATURES]
        for name in ("raw_flows_forward", "raw_flows_backward", "latent_moments", "image_embeds"):
            assert torch.equal(getattr(x, name), getattr(y, name).cpu()), name
        assert y.latent_moments.device.type == device
    dali.close()
