"""The parallelize step in one gloo process: FSDP2 units hand back no views (issue 17.10: FSDP2 warned
on every training step that a view output "can cause backward to fail or produce wrong gradients"),
and the sharded UNet computes the plain UNet's loss and gradients."""

from __future__ import annotations

import copy
import json
import socket
import warnings

import pytest
import torch
import torch.distributed as dist

from fff_vdi.config import ParallelConfig
from fff_vdi.distributed.parallelize import parallelize_unet
from fff_vdi.models.components import BUNDLED_CONFIGS
from fff_vdi.models.unet import FFFVDIUNet
from fff_vdi.train.optim import mark_trainable

VIEW_WARNING = "returned a view tensor"


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def unet_inputs(batch: int, frames: int = 4, size: int = 128, cross_dim: int = 32) -> tuple:
    g = torch.Generator().manual_seed(0)
    h = w = size // 8
    flows = tuple(torch.randn(batch, frames - 1, 2, size, size, generator=g) for _ in range(2))
    masks = (torch.rand(batch, frames, 1, size, size, generator=g) > 0.5).float()
    return (torch.randn(batch, frames, 8, h, w, generator=g), masks, flows, torch.full((batch,), 0.7),
            torch.randn(batch, 1, cross_dim, generator=g), torch.tensor([[7.0, 127.0, 0.02]] * batch))


def test_fsdp_units_return_no_views_and_the_plain_gradients(process_group):
    torch.manual_seed(0)
    unet = FFFVDIUNet.from_config(json.loads((BUNDLED_CONFIGS / "tiny" / "unet" / "config.json").read_text()))
    mark_trainable(unet, "temporal")
    plain = copy.deepcopy(unet)
    parallelize_unet(unet, ParallelConfig(mixed_precision="float32"), world_size=1, device=torch.device("cpu"))
    inputs = unet_inputs(batch=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = unet(*inputs).square().mean()
        loss.backward()
    assert not [str(w.message) for w in caught if VIEW_WARNING in str(w.message)]
    expected = plain(*inputs).square().mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    sharded = dict(unet.named_parameters())
    trained = [name for name, p in plain.named_parameters() if p.requires_grad]
    assert trained and all(sharded[name].grad is not None for name in trained)
    for name in trained:
        grad = sharded[name].grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        torch.testing.assert_close(grad, plain.get_parameter(name).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpointing", ["off", "full"])
def test_unit_scope_compiles_each_unit_and_repeated_units_share_a_graph(process_group, checkpointing):
    """Regional compilation (parallel.compile_scope=unit): every resnet, attention and resampler is
    compiled on its own (with full activation checkpointing: its checkpointed wrapper), units of one
    class and shape share one dynamo graph (fewer graphs to build), and the compiled UNet computes
    the plain UNet's loss."""
    from fff_vdi.distributed.parallelize import compile_units, unet_blocks

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graphs, run as traced (no inductor on the CPU)
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    unet = FFFVDIUNet.from_config(json.loads((BUNDLED_CONFIGS / "tiny" / "unet" / "config.json").read_text()))
    mark_trainable(unet, "temporal")
    plain = copy.deepcopy(unet)
    parallelize_unet(unet, ParallelConfig(mixed_precision="float32", compile=True, compile_scope="unit",
                                          activation_checkpointing=checkpointing),
                     world_size=1, device=torch.device("cpu"), compile_kwargs={"backend": counting_backend})
    units = compile_units(unet, "unit")
    compiled = [unet.noise_refiner._compiled_step is not None]
    compiled += [m._compiled_call_impl is not None for m in (p[int(n)] for p, n in units[1:])]
    assert all(compiled)
    blocks = [getattr(p, n) if not isinstance(p, torch.nn.ModuleList) else p[int(n)] for p, n in unet_blocks(unet)[1:]]
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)  # the glue runs eagerly
    inputs = unet_inputs(batch=2)
    loss = unet(*inputs).square().mean()
    loss.backward()
    assert loss.item() == pytest.approx(plain(*inputs).square().mean().item(), rel=1e-5)
    from torch._dynamo.utils import counters

    assert sum(counters["graph_break"].values()) == 0
    # The refiner's step (one graph per direction at most) and each unit: with sharing, fewer graphs
    # than compiled modules (the tiny UNet repeats its up blocks' attentions at each level).
    assert 0 < len(graphs) < len(units)
    torch._dynamo.reset()
