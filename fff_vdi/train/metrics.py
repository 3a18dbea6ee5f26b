"""Step metrics: FLOPs and MFU, throughput, data-wait share, memory; TensorBoard + metrics.jsonl; a heartbeat."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fff_vdi.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

# Dense bf16 peak of the H100 SXM and H200 (the chips' datasheet figure; MFU's denominator).
PEAK_BF16_FLOPS = 989e12


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """Multiply-adds of a modulated deformable 3x3 convolution as a dense convolution of the same
    shapes (the bilinear sampling is not counted)."""
    c_out, c_in_per_group, kh, kw = weight_shape
    return 2 * math.prod(out_shape) * c_in_per_group * kh * kw


def _deform_conv2d_backward_flops(grad_shape, input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    c_out, c_in_per_group, kh, kw = weight_shape
    return 2 * 2 * math.prod(grad_shape) * c_in_per_group * kh * kw  # input and weight gradients


def flop_counter():
    """torch's FlopCounterMode, taught torchvision's deformable convolution (used by the refiner)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    ops = getattr(torch.ops, "torchvision", None)
    if ops is not None and hasattr(ops, "deform_conv2d"):
        mapping[torch.ops.torchvision.deform_conv2d.default] = _deform_conv2d_flops
        mapping[torch.ops.torchvision._deform_conv2d_backward.default] = _deform_conv2d_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_train_flops(run_forward_backward: Callable[[], None]) -> int:
    """FLOPs of one forward + backward, counted by running it (on the meta device: no memory, no time).
    Run it on a model without activation checkpointing so that recomputation is not counted."""
    counter = flop_counter()
    with counter:
        run_forward_backward()
    return int(counter.get_total_flops())


_FLOPS: dict[tuple, int] = {}


def unet_train_flops(unet_config: dict, trainable: str, batch: int, frames: int, height: int, width: int,
                     fast_paths: bool = False) -> int:
    """FLOPs of one UNet forward + backward of `batch` clips at the training shapes, with the
    parameters of the `trainer.trainable` rule trained, counted on the meta device without
    activation checkpointing (no recomputation counted). MFU counts the published model's work
    (`fast_paths` False); with `fast_paths` the count is the work as run (fast_paths.py removes some)."""
    key = (json.dumps(unet_config, sort_keys=True, default=str), trainable, batch, frames, height, width, fast_paths)
    if key in _FLOPS:
        return _FLOPS[key]
    from fff_vdi.models.fast_paths import apply_fast_paths
    from fff_vdi.models.unet import FFFVDIUNet
    from fff_vdi.train.optim import mark_trainable

    with torch.device("meta"):
        # diffusers makes a few parameters with torch.Tensor([...]), which ignores the device context.
        unet = FFFVDIUNet.from_config(unet_config).to("meta")
        if fast_paths:
            apply_fast_paths(unet)
        mark_trainable(unet, trainable)
        h, w = height // 8, width // 8
        sample = torch.randn(batch, frames, 2 * unet.config.out_channels, h, w)
        masks = torch.zeros(batch, frames, 1, height, width)
        flows = (torch.zeros(batch, frames - 1, 2, height, width),) * 2
        embeds = torch.randn(batch, 1, unet.config.cross_attention_dim)

    def run():
        with torch.device("meta"):  # tensors the model creates inside forward land on meta too
            unet(sample, masks, flows, torch.ones(batch), embeds, torch.ones(batch, 3)).float().square().mean().backward()

    _FLOPS[key] = count_train_flops(run)
    return _FLOPS[key]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


class MetricsWriter:
    """Rank 0 writes every logged step to TensorBoard and to `<run_dir>/metrics.jsonl`, validations to
    `<run_dir>/validation.jsonl`.

    A run that starts at `start_step` (the resumed checkpoint's step, 0 when it starts afresh) runs
    the steps after it again: the rows an interrupted run logged for those are dropped from
    metrics.jsonl and validation.jsonl (rewritten atomically) and hidden in TensorBoard (SummaryWriter's purge_step),
    so every step has one row, the one of the run that continued."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        self._validation_jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(run_dir) / "metrics.jsonl"
            drop_rows_after(path, start_step)
            drop_rows_after(self.run_dir / "validation.jsonl", start_step)
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            self._jsonl = open(path, "a", buffering=1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"train/{k}", v, step)
        # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")

    def add_video(self, tag: str, video_tchw_uint8: torch.Tensor, step: int, fps: int = 7) -> None:
        """An animated GIF in TensorBoard's images tab, encoded with PIL (what SummaryWriter.add_video
        writes, without its moviepy 1.x dependency)."""
        if not self.enabled:
            return
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames = [Image.fromarray(f) for f in video_tchw_uint8.permute(0, 2, 3, 1).cpu().numpy()]
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
        image = Summary.Image(height=frames[0].height, width=frames[0].width, colorspace=3,
                              encoded_image_string=buffer.getvalue())
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def add_validation(self, step: int, values: dict) -> None:
        """One validation's scalars: TensorBoard `val/<name>` and a line of `<run_dir>/validation.jsonl`."""
        if not self.enabled:
            return
        for k, v in values.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"val/{k}", v, step)
        if self._validation_jsonl is None:
            self._validation_jsonl = open(self.run_dir / "validation.jsonl", "a", buffering=1)
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self._validation_jsonl.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            if self._validation_jsonl is not None:
                self._validation_jsonl.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to `step`; a row cut short by a kill (no valid JSON) goes too."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
        log.info("%s: dropped %d row(s) after step %d, which this run logs again", path, dropped, step)


class Heartbeat:
    """A daemon thread on every rank logging the step and the seconds since the last finished step,
    so that a hung collective shows in the logs long before the NCCL timeout fires."""

    def __init__(self, rank: int, every_s: float):
        self.rank, self.every_s = rank, every_s
        self.step, self.last = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info("heartbeat rank %d: step %d, last step finished %.0fs ago",
                     self.rank, self.step, time.monotonic() - self.last)

    def stop(self) -> None:
        self._stop.set()
