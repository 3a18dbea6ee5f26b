"""The training step (fff_vdi/train/step.py) in one process on the CPU with the tiny model: the decisions
it takes, the conditioning it accepts precomputed, and the configurations it refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fff_vdi.config import ExperimentConfig, ParallelConfig, validate
from fff_vdi.distributed.env import DistInfo
from fff_vdi.errors import ConfigError
from fff_vdi.models.components import build_random_components

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_config(**trainer) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data = dataclasses.replace(cfg.data, shards="synthetic", num_frames=3, height=128, width=128)
    cfg.model = dataclasses.replace(cfg.model, pretrained=None, random_init="tiny", raft_iters=1, frozen_dtype="float32")
    cfg.parallel = dataclasses.replace(cfg.parallel, mixed_precision="float32")
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-3)
    cfg.trainer = dataclasses.replace(cfg.trainer, validate_every=0, **trainer)
    return validate(cfg)


def clip_batch(seed: int, t: int = 3, size: int = 128) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, t, 1, size, size)
    masks[..., 30:90, 40:100] = 1
    return {"pixel_values": torch.rand(1, t, 3, size, size, generator=g) * 2 - 1, "mask_values": masks}


def build(cfg: ExperimentConfig):
    from fff_vdi.train.step import build_train_step

    return build_train_step(cfg, CPU, build_random_components("tiny", seed=0))


def test_step_agrees_on_stop_and_skips_or_stops_on_a_non_finite_loss(monkeypatch):
    import fff_vdi.train.step as step_module
    from fff_vdi.train.step import NonFiniteError

    train_step = build(tiny_config(nonfinite="skip"))
    out = train_step(iter([clip_batch(0)]), 0, stop_requested=lambda: 2)
    assert out.updated and out.stop == 2 and out.loss > 0 and out.grad_norm > 0 and out.lr == 1e-3
    before = [p.detach().clone() for p in train_step.params]
    edm_loss = step_module.edm_loss
    monkeypatch.setattr(step_module, "edm_loss", lambda *a, **k: edm_loss(*a, **k) * float("nan"))
    out = train_step(iter([clip_batch(1)]), 1)
    assert not out.updated and not out.stop and out.loss != out.loss  # NaN
    assert train_step.nonfinite_skips == 1 and train_step.state_dict() == {"nonfinite_skips": 1}
    assert all(torch.equal(a, p) for a, p in zip(before, train_step.params))  # no update, gradients dropped
    assert all(p.grad is None for p in train_step.params)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train_step.cfg.trainer.nonfinite = "stop"
        train_step(iter([clip_batch(2)]), 2)
    monkeypatch.undo()
    out = train_step(iter([clip_batch(3)]), 3)
    assert out.updated and not all(torch.equal(a, p) for a, p in zip(before, train_step.params))


def test_precomputed_clean_clip_features_give_the_online_conditioning():
    """What a conditioning cache delivers with the batch (objective.CleanClipFeatures) replaces RAFT, the
    clean clip's VAE encode and CLIP, and the step's random draws stay the same."""
    from fff_vdi.config import ObjectiveConfig
    from fff_vdi.train.objective import CLEAN_FEATURES, FrozenConditioner, step_generator

    conditioner = FrozenConditioner(build_random_components("tiny", seed=0), ObjectiveConfig(), 1, torch.float32,
                                    torch.device("cpu"))
    batch = clip_batch(0)
    features = conditioner.clean_features(batch["pixel_values"])
    online = conditioner(batch, step_generator(1, 0, 5, 0, torch.device("cpu")))
    cached = conditioner({**batch, CLEAN_FEATURES: features}, step_generator(1, 0, 5, 0, torch.device("cpu")))
    for name in ("latents", "cond_latents", "cond_sigma", "image_embeds", "flows_forward", "flows_backward"):
        assert torch.equal(getattr(online, name), getattr(cached, name)), name
    # The delivered features are the ones used (not recomputed behind the cache's back).
    other = dataclasses.replace(features, image_embeds=torch.zeros_like(features.image_embeds))
    assert not conditioner({**batch, CLEAN_FEATURES: other}, step_generator(1, 0, 5, 0, torch.device("cpu"))).image_embeds.any()


def test_latents_drawn_from_moments_are_diffusers_posterior_samples():
    """The clean clip's latents, split into moments (cacheable) and a draw, equal the posterior samples
    of each encoder call of 16 frames: the numbers training drew before the split."""
    from fff_vdi.models.encoders import encode_frames

    vae = build_random_components("tiny", seed=0).vae
    frames = torch.rand(2, 10, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 20 frames: 2 calls
    with torch.no_grad():
        split = encode_frames(vae, frames, sample=True, scaled=True, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        flat = frames.flatten(0, 1)
        reference = torch.cat([vae.encode(flat[s:s + 16]).latent_dist.sample(g) for s in (0, 16)])
    assert torch.equal(split, (reference * vae.config.scaling_factor).unflatten(0, (2, 10)))


def test_configurations_the_step_cannot_serve_are_refused():
    from fff_vdi.distributed.parallelize import parallelize_unet

    cfg = tiny_config()
    with pytest.raises(ConfigError, match="experiment.parallel.autocast"):
        validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, autocast="float16")))  # FSDP on
    with pytest.raises(ConfigError, match="experiment.model.flow_scale"):
        validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flow_scale=0.0)))
    unet = build_random_components("tiny", meta=True).unet
    with pytest.raises(ConfigError, match="experiment.parallel.fsdp"):  # nothing would reduce the gradients
        parallelize_unet(unet, ParallelConfig(fsdp=False), world_size=2, device=torch.device("cpu"))


def test_ema_names_are_the_state_dicts_under_activation_checkpointing():
    """The export reads the EMA back by the UNet's state-dict names; checkpoint wrappers must not leak in."""
    from fff_vdi.train.optim import updated_parameter_names

    cfg = tiny_config()
    cfg.optim.ema_decay = 0.9
    cfg.parallel.activation_checkpointing = "full"
    train_step = build(cfg)
    reference = build_random_components("tiny", meta=True).unet
    assert set(train_step.ema.names) == set(updated_parameter_names(reference, "temporal", fast_paths=True))


def test_loss_scaler_skips_overflows_and_survives_a_skipped_step(monkeypatch):
    """The published recipe's loss scaling (parallel.autocast=float16, CUDA's), exercised with a scaler on
    the CPU: an overflow is the scaler's skip (counted, the scale halves), not a non-finite error; a
    skipped non-finite step leaves it ready; its state goes into the checkpoint's state.json and back."""
    import fff_vdi.train.step as step_module

    train_step = build(tiny_config(nonfinite="skip"))
    train_step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows the float32 gradients' norm
    before = [p.detach().clone() for p in train_step.params]
    out = train_step(iter([clip_batch(0)]), 0)
    assert not out.updated and train_step.overflow_skips == 1 and train_step.nonfinite_skips == 0
    assert train_step.scaler.get_scale() == 2.0**39 and all(torch.equal(a, p) for a, p in zip(before, train_step.params))
    edm_loss = step_module.edm_loss
    monkeypatch.setattr(step_module, "edm_loss", lambda *a, **k: edm_loss(*a, **k) * float("nan"))
    out = train_step(iter([clip_batch(1)]), 1)
    assert not out.updated and train_step.nonfinite_skips == 1 and train_step.scaler.get_scale() == 2.0**38
    state = train_step.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**38
    fresh = build(tiny_config())
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 2.0**38 and fresh.nonfinite_skips == 1
