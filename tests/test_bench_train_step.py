"""bench/train_step.py on the CPU with the tiny model, and the exactness of what it switches on for speed."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import statistics
import sys

import pytest
import torch

from conftest import REPO, run_tool
from fff_vdi.errors import ConfigError

# The tiny model at a CPU size, for every configuration (the trainer's own keys).
TINY = ["--device", "cpu", "--steps", "1", "--warmup", "1", "experiment.model.random_init=tiny",
        "experiment.model.raft_iters=2", "experiment.model.frozen_dtype=float32", "experiment.data.num_frames=4",
        "experiment.data.height=128", "experiment.data.width=128"]
PHASES = ("raft", "flow_completion", "vae", "clip", "unet_forward", "backward", "optimizer", "other", "data_wait")
EAGER = "experiment=paper_512x256 experiment.parallel.compile=false experiment.parallel.compile_frozen=false"


def load_bench():
    if "bench_train_step" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench" / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        from fff_vdi.config import register_configs

        register_configs()
    return sys.modules["bench_train_step"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One run of the benchmark: the published recipe, paper_512x256 eager, and paper_512x256 as
    configured (compiled), traced with dynamo's eager backend (one process start for all three)."""
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    proc = run_tool("bench/train_step.py", *TINY, "--config", "experiment=published_recipe", "--config", EAGER,
                    "--config", "experiment=paper_512x256", "--compile-backend", "eager", "--out", str(out))
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_both_configurations_run_and_report(bench_run):
    report, stdout = bench_run
    for key in ("card", "torch", "diffusers", "world_size", "configs", "notes", "command"):
        assert key in report, key
    assert report["world_size"] == 1
    published, ours, _ = report["configs"]
    assert (published["experiment"], ours["experiment"]) == ("published_recipe", "paper_512x256")
    for r in (published, ours):
        assert r["status"] == "ok", r.get("traceback")
        assert r["config"]["data"]["num_frames"] == 4 and r["config"]["model"]["raft_iters"] == 2  # common overrides
        assert set(PHASES) <= set(r["phases_s"]) and r["phases_s"]["data_wait"] == 0.0
        assert all(v >= 0 for v in r["phases_s"].values())
        assert r["phases_s"]["raft"] > 0 and r["phases_s"]["unet_forward"] > 0 and r["phases_s"]["backward"] > 0
        assert r["step_s"] > 0 and r["clips_per_s_per_gpu"] == pytest.approx(r["batch_per_gpu"] / r["step_s"])
        # Each timed step on its own, inside the timed window.
        timed = report["steps"]["timed"]
        assert len(r["step_s_each"]) == timed and 0 < sum(r["step_s_each"]) <= r["step_s"] * timed
        assert r["step_s_median"] == pytest.approx(statistics.median(r["step_s_each"]))
        assert r["unet_mfu"] > 0 and r["step_mfu"] > 0 and r["unet_flops_per_step"] > 0
        assert math.isfinite(r["final_loss"]) and r["nonfinite_skips"] == 0
        assert r["speedup_vs_published"] == pytest.approx(r["clips_per_s_per_gpu"] / published["clips_per_s_per_gpu"])
    # The recipes as their experiment files say, the common overrides and the configuration's own applied.
    assert published["config"]["parallel"]["autocast"] == "float16" and published["config"]["parallel"]["fsdp"] is False
    assert published["config"]["data"]["batch_size"] == 1 and published["config"]["optim"]["fused"] is False
    assert ours["config"]["parallel"]["compile"] is False and ours["config"]["parallel"]["fast_paths"] is True
    assert ours["config"]["parallel"]["reshard_after_forward"] is False
    # The fast paths remove work: fewer FLOPs as run than in the published model's count.
    assert ours["unet_flops_per_clip"] < ours["reference_unet_flops_per_clip"] == published["unet_flops_per_clip"]
    assert "| config |" in "\n".join(stdout.strip().splitlines()[-8:])  # the table is printed last


@pytest.mark.slow
def test_compiled_path_traces_without_graph_breaks(bench_run):
    """What the GPU run compiles (UNet blocks under FSDP2, the frozen networks), traced by dynamo with
    its eager backend: cheap on the CPU, and it fails on what would break or split the graphs."""
    report, _ = bench_run
    compiled = report["configs"][2]
    assert compiled["status"] == "ok", compiled.get("traceback")
    assert compiled["config"]["parallel"]["compile"] is True and compiled["config"]["parallel"]["compile_frozen"] is True
    assert compiled["compile"]["graph_breaks"] == 0 and compiled["compile"]["unique_graphs"] > 10


def test_configurations_are_the_trainers_and_bad_keys_are_named():
    bench = load_bench()
    common = ["experiment.data.batch_size=2", "experiment.parallel.compile=false"]
    overrides = bench.merged_overrides(common, "experiment=paper_512x256 experiment.data.batch_size=3")
    assert overrides[0] == "model=svd_xt_random" and "experiment.data.batch_size=3" in overrides  # its own win
    assert "experiment.data.batch_size=2" not in overrides
    cfg = bench.compose(overrides)
    assert (cfg.name, cfg.data.batch_size, cfg.parallel.compile, cfg.model.random_init) == ("paper_512x256", 3, False, "svd_xt")
    with pytest.raises(Exception, match="reshard"):  # a key the schema does not have (Hydra names it)
        bench.compose(bench.merged_overrides([], "experiment.parallel.reshard=false"))
    with pytest.raises(ConfigError, match="experiment.parallel.activation_checkpointing"):
        bench.compose(bench.merged_overrides([], "experiment.parallel.activation_checkpointing=some"))


def test_unet_train_flops_count_the_trained_work():
    """The one FLOP counter (trainer MFU and benchmark): linear in the batch, more with every parameter
    trained (their weight gradients), less with the fast paths."""
    from fff_vdi.models.components import build_random_components
    from fff_vdi.train.metrics import unet_train_flops

    config = dict(build_random_components("tiny", meta=True).unet.config)
    one = unet_train_flops(config, "temporal", 1, 4, 128, 128)
    assert one > 0 and unet_train_flops(config, "temporal", 2, 4, 128, 128) == 2 * one
    assert unet_train_flops(config, "all", 1, 4, 128, 128) > one
    assert unet_train_flops(config, "temporal", 1, 4, 128, 128, fast_paths=True) < one


def test_fast_paths_keep_outputs_and_gradients():
    from fff_vdi.models.components import build_random_components
    from fff_vdi.models.fast_paths import apply_fast_paths
    from fff_vdi.train.optim import mark_trainable

    reference = build_random_components("tiny", seed=0).unet
    mark_trainable(reference, "temporal")
    fast = copy.deepcopy(reference)
    changed = apply_fast_paths(fast)
    assert changed["temporal_convs"] > 0 and changed["single_key_cross_attention"] > 0
    assert fast.state_dict().keys() == reference.state_dict().keys()

    g = torch.Generator().manual_seed(0)
    b, t, h, w = 1, 4, 128, 128
    inputs = (torch.randn(b, t, 8, h // 8, w // 8, generator=g), (torch.rand(b, t, 1, h, w, generator=g) > 0.5).float(),
              (torch.randn(b, t - 1, 2, h, w, generator=g), torch.randn(b, t - 1, 2, h, w, generator=g)),
              torch.tensor([0.3]), torch.randn(b, 1, reference.config.cross_attention_dim, generator=g),
              torch.tensor([[7.0, 127.0, 0.02]]))
    outs = []
    for model in (reference, fast):
        model.train()
        out = model(*inputs)
        out.square().mean().backward()
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[0].abs().max()
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        if q.grad is None:
            # Only what feeds the query of a one-key cross-attention loses its (exactly zero) gradient.
            assert p.grad is None or p.grad.abs().max() < 1e-8, name
            continue
        assert (p.grad - q.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-9, name


def test_downscaled_flows_come_back_at_full_size():
    from fff_vdi.config import ObjectiveConfig
    from fff_vdi.models.components import build_random_components
    from fff_vdi.train.objective import FrozenConditioner

    components = build_random_components("tiny", seed=0)
    conditioner = FrozenConditioner(components, ObjectiveConfig(), 1, torch.float32, torch.device("cpu"), flow_scale=0.5)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 3, 256, 256, generator=g) * 2 - 1
    masks = torch.zeros(1, 3, 1, 256, 256)
    masks[..., 100:150, 60:200] = 1
    with torch.no_grad():
        forward, backward = conditioner.flows(pixels, masks)
    assert forward.shape == backward.shape == (1, 2, 2, 256, 256)
    assert torch.isfinite(forward).all() and torch.isfinite(backward).all()
    with pytest.raises(ValueError, match="flow_scale"):
        FrozenConditioner(components, ObjectiveConfig(), 1, torch.float32, torch.device("cpu"), flow_scale=0.0)


def test_kernel_summary_classes_and_bounds():
    """The UNet profile's summary: classes by kernel name (inductor's fused kernels even when their
    names hold "convolution"), busy time as the union of overlapping spans, communication apart, and
    the FLOP kernels' throughput from their time alone."""
    from fff_vdi.train import profiling  # the profiler is a trainer component

    assert profiling.kernel_class("triton_poi_fused_convolution_silu_3") == "fused_triton"
    assert profiling.kernel_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "matmul_conv"
    assert profiling.kernel_class("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul_conv"
    assert profiling.kernel_class("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert profiling.kernel_class("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "layout"
    assert profiling.kernel_class("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert profiling.kernel_class("Memcpy DtoD (Device -> Device)") == "copy"
    assert profiling.kernel_class("void at::native::vectorized_elementwise_kernel<4>") == "other"
    assert profiling.busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    kernels = [("sm90_xmma_gemm_bf16", 0.0, 0.4), ("flash_bwd_kernel", 0.4, 0.5), ("triton_red_fused_1", 0.5, 1.0),
               ("ncclDevKernel_ReduceScatter", 0.2, 1.5)]
    flops = int(0.5 * profiling.PEAK_BF16_FLOPS)  # half a second's worth at the peak
    s = profiling.summarize_kernels(kernels, wall_s=2.0, flops=flops)
    assert s["compute_busy_s"] == pytest.approx(1.0)  # communication left out
    assert s["gpu_idle_fraction"] == pytest.approx(0.5)
    assert s["class_s"]["communication"] == pytest.approx(1.3)
    assert s["class_share_of_compute"] == pytest.approx({"matmul_conv": 0.4, "attention": 0.1, "fused_triton": 0.5})
    assert s["mfu_if_only_flop_kernels"] == pytest.approx(1.0)  # 0.5 s of peak work in 0.5 s of FLOP kernels
    assert s["mfu_of_busy_time"] == pytest.approx(0.5)
    assert s["top_kernels_ms"][0] == {"kernel": "ncclDevKernel_ReduceScatter", "class": "communication", "ms": 1300.0}


def test_cached_conditioning_batches_spare_the_clean_clip_networks():
    """--conditioning cached: each synthetic batch carries the clean clip's features in the cache's
    shapes and dtypes, and the step's conditioner then runs no RAFT, no clean-clip encode, no CLIP."""
    from fff_vdi.models.components import build_components
    from fff_vdi.train.objective import CLEAN_FEATURES, FrozenConditioner

    bench = load_bench()
    cfg = bench.compose(bench.merged_overrides(TINY[6:], EAGER))
    components = build_components(cfg.model, seed=0, device=torch.device("cpu"))
    embed_dim = components.image_encoder.config.projection_dim
    batch = bench.synthetic_batches(cfg, 1, torch.device("cpu"), seed=0, embed_dim=embed_dim)[0]
    d, features = cfg.data, batch[CLEAN_FEATURES]
    assert features.raw_flows_forward.shape == (d.batch_size, d.num_frames - 1, 2, d.height, d.width)
    assert features.latent_moments.shape == (d.batch_size, d.num_frames, 8, d.height // 8, d.width // 8)
    assert features.image_embeds.shape == (d.batch_size, 1, embed_dim)
    conditioner = FrozenConditioner(components, cfg.objective, cfg.model.raft_iters, torch.float32, torch.device("cpu"))

    def refuse(*args, **kwargs):
        raise AssertionError("a clean-clip network ran although the batch carried its features")

    conditioner.clean_features = refuse
    gen = torch.Generator().manual_seed(0)
    cond = conditioner(batch, gen)
    assert cond.latents.shape == (d.batch_size, d.num_frames, 4, d.height // 8, d.width // 8)
    assert "pixel_values" in batch and not any(k == CLEAN_FEATURES for k in bench.synthetic_batches(
        cfg, 1, torch.device("cpu"), seed=0)[0])  # online: no features, the conditioner computes them
