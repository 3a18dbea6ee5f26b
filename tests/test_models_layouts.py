"""The full-size checkpoint layouts (shared/fixtures/parity/keys_*.txt) fit our models exactly.

Everything is built on the meta device: no memory, no weights, a strict load of names and shapes.
"""

from __future__ import annotations

import pytest
import torch

from fff_vdi.errors import WeightsError
from fff_vdi.models import FlowCompletionNet, NoiseRefiner, RAFTFlow, build_random_components
from fff_vdi.models.deform_align import modulated_deform_conv2d
from fff_vdi.models.raft import to_original_layout, to_torchvision_layout
from models_fixtures import parity_dir, read_key_file, shapes  # noqa: F401  (parity_dir is a fixture)


def meta_state(key_file) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in read_key_file(key_file).items()}


def test_bundled_svd_xt_unet_has_the_published_fff_vdi_layout(parity_dir):
    components = build_random_components("svd_xt", meta=True)
    published = meta_state(parity_dir / "keys_fff_vdi_unet_svd_xt.txt")

    assert shapes(components.unet.state_dict()) == shapes(published)
    components.unet.load_state_dict(published, strict=True, assign=True)
    assert 1.5e9 < sum(p.numel() for p in components.unet.parameters()) < 1.6e9


def test_raft_things_layout_converts_to_torchvision_exactly(parity_dir):
    with torch.device("meta"):
        raft = RAFTFlow()
    torchvision_state = raft.raft.state_dict()
    published = meta_state(parity_dir / "keys_raft_large.txt")

    converted = to_torchvision_layout(published, list(torchvision_state), "keys_raft_large.txt")

    assert shapes(converted) == shapes(torchvision_state)
    raft.raft.load_state_dict(converted, strict=True, assign=True)
    # ... and back: what save_pipeline writes is the published layout, norm3 aliases included.
    assert shapes(to_original_layout(torchvision_state)) == shapes(published)


def test_raft_conversion_names_unknown_keys(parity_dir):
    published = meta_state(parity_dir / "keys_raft_large.txt")
    published["module.extra.weight"] = torch.empty(1, device="meta")
    del published["module.update_block.mask.2.bias"]
    with torch.device("meta"):
        keys = list(RAFTFlow().raft.state_dict())
    with pytest.raises(WeightsError, match=r"(?s)missing \(1\): update_block\.mask\.2\.bias.*unexpected \(1\): extra\.weight"):
        to_torchvision_layout(published, keys, "raft-things.pth")


def test_flow_completion_has_the_propainter_layout(parity_dir):
    with torch.device("meta"):
        completion = FlowCompletionNet()
    published = meta_state(parity_dir / "keys_flow_completion.txt")

    assert shapes(completion.state_dict()) == shapes(published)
    completion.load_state_dict(published, strict=True, assign=True)


def test_refiner_channels_must_divide_into_deformable_groups():
    with pytest.raises(ValueError, match="divisible by its 16 deformable groups"):
        NoiseRefiner(40)


def test_deformable_conv_shapes_are_checked_before_torchvision():
    features, weight = torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3)
    offset, modulation = torch.randn(1, 2 * 9 * 16, 8, 8), torch.rand(1, 9 * 16, 8, 8)

    assert modulated_deform_conv2d(features, offset, modulation, weight, None, padding=1).shape == (1, 32, 8, 8)
    with pytest.raises(ValueError, match="modulation has shape"):
        modulated_deform_conv2d(features, offset, modulation[:, :-1], weight, None, padding=1)
    with pytest.raises(ValueError, match="offset has shape"):
        modulated_deform_conv2d(features, offset[..., :7], modulation, weight, None, padding=1)
    with pytest.raises(ValueError, match="not a positive multiple"):
        modulated_deform_conv2d(features, offset[:, :-1], modulation, weight, None, padding=1)
    with pytest.raises(ValueError, match="do not divide"):
        modulated_deform_conv2d(features[:, :30], offset, modulation, weight[:, :30], None, padding=1)


def test_deformable_conv_runs_bfloat16_in_float32():
    """torchvision has no bfloat16 deform_conv2d kernel: bfloat16 inputs compute in float32."""
    features, weight = torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3) / 17
    offset, modulation = torch.randn(1, 2 * 9 * 16, 8, 8), torch.rand(1, 9 * 16, 8, 8)
    bias = torch.randn(32)
    reference = modulated_deform_conv2d(features, offset, modulation, weight, bias, padding=1)

    half = [t.bfloat16() for t in (features, offset, modulation, weight, bias)]
    out = modulated_deform_conv2d(*half[:4], half[4], padding=1)

    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.1, rtol=0.05)
