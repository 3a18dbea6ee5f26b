"""The tiny pipeline end to end: make -> load -> save -> load, flows, encoders, UNet calls."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from fff_vdi.errors import InputError, WeightsError
from fff_vdi.models import (
    Components,
    decode_latents,
    encode_first_frame,
    encode_frames,
    load_components,
    save_pipeline,
)
from fff_vdi.models.encoders import resize_with_antialiasing

B, T, H, W = 1, 3, 128, 128


@pytest.fixture(scope="module")
def components(tiny_pipeline) -> Components:
    return load_components(str(tiny_pipeline))


@pytest.fixture(scope="module")
def clip() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(B, T, 3, H, W, generator=g) * 2 - 1
    masks = torch.zeros(B, T, 1, H, W)
    masks[..., 40:90, 30:100] = 1
    return {"frames": frames, "masks": masks}


def run_everything(c: Components, clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One pass through every network, the way a training step uses them."""
    frames, masks = clip["frames"], clip["masks"]
    with torch.no_grad():
        flows = c.flow_completion(*c.raft.bidirectional(frames, iters=2), masks)
        latents = encode_frames(c.vae, frames, sample=False, scaled=True)
        condition = encode_frames(c.vae, frames * (1 - masks), sample=False, scaled=False)
        embedding = encode_first_frame(c.image_encoder, c.feature_extractor, frames)
        time_ids = torch.tensor([[7.0, 127.0, 0.02]])
        out = c.unet(torch.cat([latents, condition], dim=2), masks, flows, torch.tensor([0.3]), embedding, time_ids)
        decoded = decode_latents(c.vae, latents, chunk=2)
    return {"flows_forward": flows[0], "flows_backward": flows[1], "latents": latents, "embedding": embedding, "out": out, "decoded": decoded}


def test_tiny_pipeline_round_trip_is_exact(tiny_pipeline, components, clip, tmp_path):
    assert json.loads((tiny_pipeline / "model_index.json").read_text())["unet"] == ["fff_vdi.models", "FFFVDIUNet"]
    # The tool writes RAFT in the original raft-things.pth layout, so loading exercised the conversion.
    assert all(k.startswith("module.") for k in torch.load(tiny_pipeline / "raft" / "raft-things.pth", weights_only=True))

    saved = save_pipeline(components, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the temporary folder was renamed
    again = load_components(str(saved))

    first, second = run_everything(components, clip), run_everything(again, clip)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert first["out"].shape == (B, T, 4, H // 8, W // 8)
    assert first["embedding"].shape == (B, 1, components.unet.config.cross_attention_dim)
    assert first["decoded"].shape == (B, T, 3, H, W) and first["decoded"].dtype == torch.float32
    assert again.scheduler.config.prediction_type == "v_prediction"


def test_save_pipeline_replaces_and_checks_an_exported_unet_state(components, tmp_path):
    out = tmp_path / "export"
    save_pipeline(components, out)
    state = {k: torch.zeros_like(v) for k, v in components.unet.state_dict().items()}
    save_pipeline(components, out, unet_state_dict=state, overwrite=True)
    reloaded = load_components(str(out))
    assert all(torch.count_nonzero(v) == 0 for v in reloaded.unet.state_dict().values())
    del state["conv_in.weight"]
    with pytest.raises(WeightsError, match=r"missing \(1\): conv_in\.weight"):
        save_pipeline(components, out, unet_state_dict=state, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind


def test_unet_override_takes_a_unet_folder(tiny_pipeline, components):
    """(A pipeline folder or repo as override goes through the same `subfolder="unet"` path as the default.)"""
    unet = load_components(str(tiny_pipeline), unet=str(tiny_pipeline / "unet")).unet
    for name, tensor in components.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name


def test_bidirectional_flows_have_the_published_directions(components, clip):
    frames = clip["frames"]
    forward, backward = components.raft.bidirectional(frames, iters=2)

    assert forward.shape == backward.shape == (B, T - 1, 2, H, W)
    for t in range(T - 1):
        assert torch.allclose(forward[:, t], components.raft(frames[:, t], frames[:, t + 1], iters=2), atol=1e-4)
        assert torch.allclose(backward[:, t], components.raft(frames[:, t + 1], frames[:, t], iters=2), atol=1e-4)
    chunked = components.raft.bidirectional(frames, iters=2, max_pairs_per_call=3)
    assert torch.allclose(chunked[0], forward, atol=1e-4) and torch.allclose(chunked[1], backward, atol=1e-4)


@pytest.mark.parametrize("size", [(120, 128), (128, 100), (136, 132)])
def test_raft_rejects_frames_it_cannot_take(components, size):
    frames = torch.zeros(1, 2, 3, *size)
    with pytest.raises(InputError, match=rf"{size[0]}x{size[1]}"):
        components.raft.bidirectional(frames)


def test_encode_frames_sample_mode_and_scaling(components, clip):
    vae, frames = components.vae, clip["frames"]
    mode = encode_frames(vae, frames, sample=False, scaled=False, chunk=2)
    scaled = encode_frames(vae, frames, sample=False, scaled=True)
    sampled = encode_frames(vae, frames, sample=True, scaled=False, generator=torch.Generator().manual_seed(0))

    assert mode.shape == (B, T, 4, H // 8, W // 8)
    assert torch.allclose(scaled, mode * 0.18215, atol=1e-6)
    assert not torch.allclose(sampled, mode)


def test_clip_embedding_preprocessing_is_the_published_one(components, clip):
    images = clip["frames"][:, 0]
    # The published resize is diffusers' SVD `_resize_with_antialiasing`.
    assert torch.allclose(resize_with_antialiasing(images, (224, 224)), _resize_with_antialiasing(images, (224, 224)), atol=1e-6)
    # The normalisation is CLIPImageProcessor's on the resized [0, 1] image.
    resized = (_resize_with_antialiasing(images, (224, 224)) + 1) / 2
    pixels = components.feature_extractor(
        images=resized, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        expected = components.image_encoder(pixel_values=pixels).image_embeds.unsqueeze(1)
        ours = encode_first_frame(components.image_encoder, components.feature_extractor, clip["frames"])
    assert torch.allclose(ours, expected, atol=1e-5)


def test_unet_tiles_guidance_over_a_classifier_free_batch(components):
    """Masks and flows of batch 1 serve a sample batch of 2 ([uncond, cond]), as in the published sampler."""
    g = torch.Generator().manual_seed(1)
    h, w = 8, 8
    sample = torch.randn(2, T, 8, h, w, generator=g)
    masks = (torch.rand(1, T, 1, 8 * h, 8 * w, generator=g) > 0.5).float()
    flows = (torch.randn(1, T - 1, 2, 8 * h, 8 * w, generator=g), torch.randn(1, T - 1, 2, 8 * h, 8 * w, generator=g))
    embedding = torch.randn(2, 1, 32, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)
    with torch.no_grad():
        both = components.unet(sample, masks, flows, 0.5, embedding, time_ids)
        second = components.unet(sample[1:], masks, flows, 0.5, embedding[1:], time_ids[1:])
    assert torch.allclose(both[1:], second, atol=1e-4)


def test_unet_runs_latent_sizes_that_are_not_multiples_of_eight(components):
    """432x240 video gives 54x30 latents; the up blocks are told their skips' sizes."""
    h, w = 12, 20  # not multiples of 2**3
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(1, T, 1, 8 * h, 8 * w)
    flows = (torch.zeros(1, T - 1, 2, 8 * h, 8 * w), torch.zeros(1, T - 1, 2, 8 * h, 8 * w))
    with torch.no_grad():
        out = components.unet(torch.randn(1, T, 8, h, w, generator=g), masks, flows, 0.1, torch.randn(1, 1, 32, generator=g), torch.tensor([[6.0, 127.0, 0.02]]))
    assert out.shape == (1, T, 4, h, w)
