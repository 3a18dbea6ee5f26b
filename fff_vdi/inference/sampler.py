"""The published FFF-VDI sampler (docs/FFF-VDI.md, 'Sampling'), as a library call.

    sampler = InpaintSampler(components, num_steps=25, dtype=torch.bfloat16, device="cuda")
    frames_out = sampler(frames_btchw, masks_bt1hw, generator=torch.Generator().manual_seed(0))

One call inpaints one clip (the model's window): frames (B, T, 3, H, W) in [-1, 1], masks
(B, T, 1, H, W) with 1 = hole, H and W multiples of 8 (and at least 128 for RAFT). It returns the
decoded clip in [-1, 1], float32, on the frames' device, not composited into the input.

What happens, in the published order:

1. Flows: RAFT (`raft_iters`) between neighbouring frames of the input as given, then flow
   completion inside the holes. Published quirk: RAFT sees the frames "unmasked". In the
   published validation those frames still contain the hole's ground truth (or the object to
   remove), so the flow outside-and-inside comes from content the model should not see. For a
   user's video the input frames are all there is: we run RAFT on them as given and let the
   completion network replace the flows inside the holes, which is what the published pipeline
   does with the same input.
2. Condition latents: VAE mode of each masked frame + `noise_aug_strength` * N(0, 1) noise
   (not scaled by the VAE factor, as in training); CLIP embedding of the first input frame as
   given (the published image condition: the unmasked first frame).
3. Classifier-free guidance: the negative is a zero image embedding and zero condition latents;
   the guidance scale rises linearly over the frames from `min_guidance` to `max_guidance`.
   Time ids: fps - 1 (SVD's convention: the published pipeline subtracts 1 from fps=7),
   motion bucket, noise augmentation strength.
4. First-frame filling: the published `ddim_inversion` (see `_first_frame_filling`), then the
   Euler loop of SVD's `EulerDiscreteScheduler`, then VAE decoding `decode_chunk` frames at a time.

Memory (fff_vdi/inference/memory.py chooses these for a GPU): `offload=True` keeps every network on
the host and moves each to the device only while it runs (RAFT and flow completion, the VAE, CLIP,
the UNet for the whole denoising loop, the VAE again), so the device holds one network's weights at
a time; `decode_chunk` frames go through the VAE per call (its activations grow with it);
`ff_chunking` runs the UNet's feed-forward layers one frame at a time (diffusers'
`enable_forward_chunking`: the same result, a fraction of their activation memory).

The UNet is called exactly 2 * num_steps times whatever the data (FSDP ranks stay in step).
All randomness (condition noise, then initial latents) comes from `generator` (drawn on the
generator's device, so a CPU generator gives the same noise on any device). The published code
drew its noise in another order and shape, so its random stream is not reproduced bit for bit.
Not reproduced either: the published decoder chunks ran over both guidance halves flattened
together, so a chunk could mix the end of one half with the start of the other; we decode only
the kept half, in chunks that stay inside the clip.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from fff_vdi.errors import InputError, WeightsError
from fff_vdi.models.components import Components
from fff_vdi.models.encoders import decode_latents, encode_first_frame, encode_frames

# RAFT's all-pairs correlation volume grows with (H/8 * W/8)^2 per frame pair: pairs per RAFT call
# are chosen to keep the correlation pyramid (about 4/3 of the first level) under this budget.
RAFT_CORRELATION_BUDGET_BYTES = 2 * 1024**3

StepCallback = Callable[[int, int], None]  # (UNet calls done, UNet calls in total)


class InpaintSampler:
    """The published sampler around FFF-VDI's frozen networks and (possibly FSDP-wrapped) UNet.

    `unet` overrides `components.unet` (the trainer passes its FSDP-wrapped UNet): it is only
    called, never moved or cast; its inputs are given in `dtype`, with timesteps, time ids, masks
    and flows in float32. Without it, `components.unet` is put on `device` in `dtype`. The frozen
    networks (VAE, CLIP, RAFT, flow completion) are put on `device` in `dtype` in place (no-ops
    when they are there already; a trainer sharing them should pass the dtype they have).
    `device` defaults to where the VAE is. With `offload` the networks stay on the host (in `dtype`)
    and visit `device` one at a time; it needs the sampler's own UNet (no `unet`).
    """

    def __init__(
        self,
        components: Components,
        *,
        num_steps: int = 25,
        min_guidance: float = 1.0,
        max_guidance: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        raft_iters: int = 20,
        decode_chunk: int = 8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        unet: torch.nn.Module | None = None,
        offload: bool = False,
        ff_chunking: bool = False,
    ):
        if not isinstance(components.scheduler, EulerDiscreteScheduler):
            raise WeightsError(
                f"the pipeline's scheduler is a {type(components.scheduler).__name__}; FFF-VDI samples with SVD's "
                f"EulerDiscreteScheduler: fix scheduler/scheduler_config.json (_class_name)"
            )
        for name, value in (("num_steps", num_steps), ("raft_iters", raft_iters), ("decode_chunk", decode_chunk)):
            if value < 1:
                raise ValueError(f"InpaintSampler: {name}={value}: use 1 or more")
        self.num_steps = num_steps
        self.min_guidance, self.max_guidance = min_guidance, max_guidance
        self.fps, self.motion_bucket_id, self.noise_aug_strength = fps, motion_bucket_id, noise_aug_strength
        self.raft_iters, self.decode_chunk = raft_iters, decode_chunk
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else next(components.vae.parameters()).device
        if offload and unet is not None:
            raise ValueError("InpaintSampler: offload moves the sampler's own networks; a passed-in unet stays where it is")
        self.offload = offload
        home = torch.device("cpu") if offload else self.device

        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast.
        for name in ("vae", "image_encoder", "raft", "flow_completion"):
            torch.nn.Module.to(getattr(components, name), device=home, dtype=dtype).eval()
        self.vae, self.raft, self.flow_completion = components.vae, components.raft, components.flow_completion
        self.image_encoder, self.feature_extractor = components.image_encoder, components.feature_extractor
        self.unet = unet if unet is not None else torch.nn.Module.to(components.unet, device=home, dtype=dtype).eval()
        if unet is None:
            set_feed_forward_chunking(self.unet, ff_chunking)
        # A scheduler of our own: set_timesteps / scale_model_input / step keep state (the step index).
        self.scheduler = EulerDiscreteScheduler.from_config(components.scheduler.config)

    @property
    def num_unet_calls(self) -> int:
        """UNet evaluations per call: num_steps for first-frame filling + num_steps Euler steps."""
        return 2 * self.num_steps

    @torch.no_grad()
    def __call__(
        self,
        frames_btchw: torch.Tensor,
        masks_bt1hw: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        flows: tuple[torch.Tensor, torch.Tensor] | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """The decoded clip (B, T, 3, H, W) in [-1, 1]; `flows` = precomputed completed (forward, backward)
        flows, each (B, T-1, 2, H, W); `callback(done, total)` after every UNet call."""
        check_clip(frames_btchw, masks_bt1hw, flows)
        frames = frames_btchw.to(self.device, torch.float32)
        masks = (masks_bt1hw.to(self.device) > 0.5).float()
        b, t = frames.shape[:2]

        flows = self.completed_flows(frames, masks) if flows is None else tuple(f.to(self.device, torch.float32) for f in flows)
        cond_latents = self.condition_latents(frames, masks, generator)
        with self.resident(self.image_encoder):
            image_embeds = encode_first_frame(self.image_encoder, self.feature_extractor, frames).float()
        # The guidance batch is [negative; positive]: zero embedding and zero condition latents first.
        cond_latents = torch.cat([torch.zeros_like(cond_latents), cond_latents])
        image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        time_ids = torch.tensor(
            [[self.fps - 1, self.motion_bucket_id, self.noise_aug_strength]], dtype=torch.float32, device=self.device
        ).repeat(2 * b, 1)
        guidance = torch.linspace(self.min_guidance, self.max_guidance, t, device=self.device).view(1, t, 1, 1, 1)

        calls_done = 0

        def unet(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            nonlocal calls_done
            sample = torch.cat([latents, cond_latents], dim=2).to(self.dtype)
            out = self.unet(sample, masks, flows, timestep, image_embeds.to(self.dtype), time_ids)
            calls_done += 1
            if callback is not None:
                callback(calls_done, self.num_unet_calls)
            return out.float()

        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_steps, device=self.device)
        latent_shape = (b, t, self.vae.config.latent_channels, frames.shape[-2] // 8, frames.shape[-1] // 8)
        latents = randn_tensor(latent_shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        with self.resident(self.unet):
            latents = self._first_frame_filling(latents, unet)

            scheduler.set_timesteps(self.num_steps, device=self.device)  # as published: resets the step index
            for timestep in scheduler.timesteps:
                prediction = unet(scheduler.scale_model_input(latents, timestep), timestep)
                uncond, cond = prediction.chunk(2)
                guided = uncond + guidance * (cond - uncond)
                # Published quirk: the latents still hold both halves of the inversion's doubled batch,
                # and the single guided prediction updates both (by broadcasting, for B = 1).
                latents = scheduler.step(torch.cat([guided, guided]), timestep, latents).prev_sample

        # Published quirk: the pipeline decodes both halves and the validation keeps `.frames[0]`,
        # the first half (the one whose inversion ran with the negative condition): decode only that.
        with self.resident(self.vae):
            decoded = decode_latents(self.vae, latents[:b], chunk=self.decode_chunk)
        return decoded.clamp(-1.0, 1.0).to(frames_btchw.device)

    @contextlib.contextmanager
    def resident(self, *modules: torch.nn.Module) -> Iterator[None]:
        """With offload: the modules on the device inside the block, back on the host after it
        (their freed device memory stays in PyTorch's cache for the next stage). Otherwise nothing."""
        if not self.offload:
            yield
            return
        for module in modules:
            torch.nn.Module.to(module, self.device)
        try:
            yield
        finally:
            for module in modules:
                torch.nn.Module.to(module, "cpu")

    def _first_frame_filling(self, latents: torch.Tensor, unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The published `ddim_inversion`, arithmetic and quirks included; returns the (2B, ...) latents.

        - It walks the Euler timesteps backwards (low noise to high) with a DDIM-style update whose
          alphas are `alphas_cumprod[i]` and `alphas_cumprod[i - 1]` of the 1000 *training* steps,
          indexed by the loop counter i (so it only ever uses the first `num_steps` training alphas,
          all close to 1), not by the timestep.
        - It treats the UNet's output (a v-prediction) as the noise eps.
        - `scale_model_input` initialises the scheduler's step index from the first timestep it
          sees, the smallest one (index num_steps - 1), and only `step()` advances it: every
          inversion call is scaled by the smallest sigma, i.e. by about 1, so the UNet sees latents
          of magnitude ~ init_noise_sigma (~700). The caller resets the index with set_timesteps.
        - The latents (batch B) are doubled for guidance at the first call, and the update broadcasts
          them to batch 2B: from then on the negative and the positive half evolve separately, each
          with its own condition's prediction (no guidance mixing here). Doubling them up front is
          the same arithmetic, for any B.
        - The published code ran under fp16 autocast; here the update is computed in float32.
        """
        scheduler = self.scheduler
        alphas_cumprod = scheduler.alphas_cumprod.to(self.device)
        latents = torch.cat([latents, latents])
        for i, timestep in enumerate(scheduler.timesteps.flip(0)):
            alpha_prod = alphas_cumprod[i]
            alpha_prod_prev = alphas_cumprod[i - 1] if i > 0 else alphas_cumprod[0]
            mu, mu_prev = alpha_prod**0.5, alpha_prod_prev**0.5
            sigma, sigma_prev = (1 - alpha_prod) ** 0.5, (1 - alpha_prod_prev) ** 0.5
            eps = unet(scheduler.scale_model_input(latents, timestep), timestep)
            pred_x0 = (latents - sigma_prev * eps) / mu_prev
            latents = mu * pred_x0 + sigma * eps
        return latents

    def completed_flows(self, frames: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RAFT flows between neighbours of the frames as given, completed inside the holes (float32)."""
        h, w = frames.shape[-2:]
        pairs = max(1, RAFT_CORRELATION_BUDGET_BYTES // _correlation_bytes_per_pair(h, w))
        with self.resident(self.raft, self.flow_completion):
            flows_forward, flows_backward = self.raft.bidirectional(frames, iters=self.raft_iters, max_pairs_per_call=pairs)
            return self.flow_completion(flows_forward.float(), flows_backward.float(), masks)

    def condition_latents(self, frames: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Unscaled VAE mode of the masked frames plus `noise_aug_strength` noise, float32 (B, T, 4, h, w)."""
        masked = frames * (1 - masks)
        noise = randn_tensor(masked.shape, generator=generator, device=self.device, dtype=torch.float32)
        with self.resident(self.vae):
            latents = encode_frames(self.vae, masked + self.noise_aug_strength * noise, sample=False, scaled=False, chunk=self.decode_chunk)
        return latents.float()


def set_feed_forward_chunking(unet: torch.nn.Module, enabled: bool) -> None:
    """Feed-forward layers one frame at a time (spatial blocks: one image of the batch; temporal
    blocks: one frame of the sequence), or all at once."""
    if enabled:
        unet.enable_forward_chunking(chunk_size=1, dim=0)
        return
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(None)


def _correlation_bytes_per_pair(height: int, width: int) -> int:
    cells = (height // 8) * (width // 8)
    return int(cells * cells * 4 * 4 / 3)


def check_clip(frames: torch.Tensor, masks: torch.Tensor, flows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Shapes the sampler takes; InputError naming what is wrong."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise InputError(f"frames must be (B, T, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
    b, t, _, h, w = frames.shape
    if tuple(masks.shape) != (b, t, 1, h, w):
        raise InputError(f"masks must be (B, T, 1, H, W) = {(b, t, 1, h, w)} for frames {tuple(frames.shape)}, got {tuple(masks.shape)}")
    if t < 2:
        raise InputError(f"a clip needs at least 2 frames (flows link neighbours), got T={t}")
    if h % 8 or w % 8:
        raise InputError(f"frame height and width must be multiples of 8 (the VAE's factor), got {h}x{w}: resize the clip")
    if flows is not None:
        expected = (b, t - 1, 2, h, w)
        if len(flows) != 2 or any(tuple(f.shape) != expected for f in flows):
            raise InputError(f"flows must be (forward, backward), each {expected}; got {[tuple(f.shape) for f in flows]}")
