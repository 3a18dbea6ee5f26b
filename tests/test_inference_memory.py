"""GPU memory: the automatic plan (estimates against the measured H200 peak, choices per budget,
forced settings kept) and the sampler's offload and feed-forward chunking (same output; networks on
the device only while they run)."""

from __future__ import annotations

import pytest
import torch

from fff_vdi.inference import InpaintSampler
from fff_vdi.inference.memory import GIB, MemorySettings, estimate_peak_bytes, network_bytes, plan_memory
from fff_vdi.models import build_random_components, load_components

GPU = torch.device("cuda")  # only read by plan_memory when no budget is given


@pytest.fixture(scope="module")
def svd_xt_weights() -> dict[str, int]:
    return network_bytes(build_random_components("svd_xt", meta=True), torch.bfloat16)


def test_the_estimate_matches_the_peak_measured_on_an_h200(svd_xt_weights):
    """bench/results/inpaint_h200.json: one 25-frame window at 1024x576 in bf16, nothing saved, 13.8 GiB."""
    estimate = estimate_peak_bytes(svd_xt_weights, 576, 1024, 25, MemorySettings()) / GIB
    assert 13.8 * 0.95 < estimate < 13.8 * 1.15, estimate
    assert 4.0 < sum(svd_xt_weights.values()) / GIB < 4.5  # UNet 2.9, CLIP 1.2, VAE 0.2, RAFT and flow completion


@pytest.mark.parametrize(
    "size, budget_gib, expected",
    [
        ((576, 1024), 80, MemorySettings()),
        ((576, 1024), 24, MemorySettings()),  # SVD-XT at 1024x576 fits a 24 GB card as is
        ((256, 512), 8.9, MemorySettings(ff_chunking=True)),
        ((576, 1024), 16, MemorySettings(offload=True, ff_chunking=True)),
        ((576, 1024), 11.2, MemorySettings(offload=True, ff_chunking=True, decode_chunk=4)),
    ],
)
def test_the_plan_takes_the_fastest_settings_that_fit(svd_xt_weights, size, budget_gib, expected):
    plan = plan_memory(GPU, svd_xt_weights, *size, 25, budget_bytes=int(budget_gib * GIB))
    assert plan.settings == expected and plan.fits
    assert plan.estimate_bytes <= 0.85 * budget_gib * GIB
    assert f"of {budget_gib:.1f} GiB" in plan.describe()


def test_the_plan_keeps_forced_settings_and_says_when_nothing_fits(svd_xt_weights):
    forced = plan_memory(GPU, svd_xt_weights, 576, 1024, 25, offload=True, decode_chunk=2, budget_bytes=80 * GIB)
    assert forced.settings == MemorySettings(offload=True, decode_chunk=2)
    hopeless = plan_memory(GPU, svd_xt_weights, 576, 1024, 25, budget_bytes=4 * GIB)
    assert not hopeless.fits and hopeless.settings == MemorySettings(offload=True, ff_chunking=True, decode_chunk=1)
    assert "expect out-of-memory" in hopeless.describe()
    on_cpu = plan_memory(torch.device("cpu"), svd_xt_weights, 576, 1024, 25)
    assert on_cpu.settings == MemorySettings() and on_cpu.budget_bytes is None


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(1, 3, 3, 128, 128, generator=g) * 2 - 1
    masks = torch.zeros(1, 3, 1, 128, 128)
    masks[..., 30:90, 40:100] = 1
    return frames, masks


def test_feed_forward_chunking_and_offload_give_the_same_result(tiny_pipeline, clip):
    outputs = {}
    for settings in (MemorySettings(), MemorySettings(ff_chunking=True), MemorySettings(offload=True, ff_chunking=True)):
        sampler = InpaintSampler(load_components(str(tiny_pipeline)), num_steps=1, raft_iters=1, offload=settings.offload,
                                 ff_chunking=settings.ff_chunking, decode_chunk=settings.decode_chunk)
        outputs[settings] = sampler(*clip, torch.Generator().manual_seed(0))
        chunked_blocks = [m for m in sampler.unet.modules() if getattr(m, "_chunk_size", None) == 1]
        assert bool(chunked_blocks) == settings.ff_chunking
    plain, chunked, offloaded = outputs.values()
    assert torch.allclose(plain, chunked, atol=1e-5) and torch.allclose(plain, offloaded, atol=1e-5)


def test_offload_puts_each_network_on_the_device_only_while_it_runs(tiny_pipeline, clip, monkeypatch):
    components = load_components(str(tiny_pipeline))
    sampler = InpaintSampler(components, num_steps=1, raft_iters=1, offload=True)
    names = {id(getattr(components, n)): n for n in ("unet", "vae", "image_encoder", "raft", "flow_completion")}
    moves = []
    original = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if id(module) in names:
            moves.append((names[id(module)], str(args[0] if args else kwargs.get("device"))))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    sampler(*clip, torch.Generator().manual_seed(0))
    stages = [("raft", "flow_completion"), ("vae",), ("image_encoder",), ("unet",), ("vae",)]
    expected = [move for stage in stages for move in [*((n, str(sampler.device)) for n in stage), *((n, "cpu") for n in stage)]]
    assert moves == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_lowers_the_peak_on_a_gpu(tiny_pipeline, clip):
    peaks, outputs = {}, {}
    for offload in (False, True):
        sampler = InpaintSampler(load_components(str(tiny_pipeline)), num_steps=1, raft_iters=1, device="cuda", offload=offload)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        outputs[offload] = sampler(*clip, torch.Generator().manual_seed(0))
        peaks[offload] = torch.cuda.max_memory_allocated()
    assert peaks[True] < peaks[False] and torch.allclose(outputs[True], outputs[False], atol=1e-4)
