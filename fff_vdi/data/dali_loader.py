"""DALI backend: JPEG decode, crop-resize, flip and normalisation on the GPU (nvJPEG + HW decoder).

Reader processes (DALI's parallel external source) run `ClipSource`: they turn a sample index into
a stream position, draw the plan and pread the window's JPEG bytes; DALI decodes the T frames with T
decoder instances (one output per frame: docs/DALI.md measured this form fastest), stacks them,
resizes the sequence to the plan's region of interest and normalises to [-1, 1] in (T, 3, H, W) layout.
Outputs reach torch through DLPack without a copy. The same graph runs on the CPU (device_id=None,
libjpeg-turbo), which the CPU tests use to exercise it.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from fff_vdi.data.clips import ClipSource
from fff_vdi.data.sampler import RankSlice

CACHED_KINDS = 3  # ClipSource.cached_records: moments, embedding, flows


class _ExternalSource:
    """The picklable per-sample callable of the parallel external source."""

    def __init__(self, source: ClipSource, rank_slice: RankSlice, with_labels: bool):
        self.source = source
        self.rank_slice = rank_slice
        self.with_labels = with_labels

    def __call__(self, sample_info):
        position = self.rank_slice.position_of_sample(sample_info.idx_in_epoch)
        plan = self.source.plan(position)
        out = [np.frombuffer(b, dtype=np.uint8) for b in self.source.frame_bytes(plan)]
        out += [
            np.asarray(plan.crop_start, dtype=np.float32),
            np.asarray(plan.crop_end, dtype=np.float32),
            np.asarray(int(plan.flip), dtype=np.int32),
            np.asarray([position], dtype=np.int64),
        ]
        if self.with_labels:
            labels = self.source.object_labels(plan)
            cfg = self.source.cfg
            out.append(labels if labels is not None else np.zeros((cfg.num_frames, cfg.height, cfg.width), np.uint8))
        if self.source.conditioning is not None:
            out += self.source.cached_records(plan)
        return tuple(out)


def build_pipeline(source: ClipSource, rank_slice: RankSlice, device_id: Optional[int], with_labels: bool):
    from nvidia.dali import fn, pipeline_def, types

    cfg = source.cfg
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    on_gpu = device_id is not None
    num_cached = CACHED_KINDS if source.conditioning is not None else 0

    @pipeline_def(
        batch_size=rank_slice.batch_size,
        num_threads=cfg.decoder_threads,
        device_id=device_id,
        py_num_workers=max(1, cfg.num_workers),
        py_start_method="spawn",  # the parent already holds CUDA: forked workers must not
        prefetch_queue_depth=cfg.prefetch,
        exec_dynamic=True,  # outputs own their memory, so DLPack views stay valid
    )
    def clip_pipeline():
        outs = fn.external_source(
            source=_ExternalSource(source, rank_slice, with_labels),
            num_outputs=T + 4 + int(with_labels) + num_cached, batch=False, parallel=True)
        frames, (roi_start, roi_end, flip, position) = outs[:T], outs[T:T + 4]
        labels = outs[T + 4:T + 4 + int(with_labels)]
        # The conditioning cache's records: copied to the GPU as whole batches, one per kind.
        cached = [o.gpu() if on_gpu else o for o in outs[T + 4 + int(with_labels):]]
        decoder = {"device": "mixed", "hw_decoder_load": cfg.hw_decoder_load} if on_gpu else {"device": "cpu"}
        # One resize over the stacked sequence (the same region for every frame) instead of one per
        # frame: a single operator and kernel launch for the clip instead of T of each.
        clip = fn.stack(*[fn.decoders.image(f, output_type=types.RGB, **decoder) for f in frames], axis_name="F")
        clip = fn.resize(clip, size=[H, W], roi_start=roi_start, roi_end=roi_end, roi_relative=True,
                         antialias=True, interp_type=types.INTERP_LINEAR)
        clip = fn.crop_mirror_normalize(clip, mirror=flip, mean=[127.5] * 3, std=[127.5] * 3,
                                        output_layout="FCHW", dtype=types.FLOAT)
        return (clip, position, *labels, *cached)

    pipe = clip_pipeline()
    pipe.build()
    return pipe


def _to_torch(tensor_list) -> torch.Tensor:
    return torch.from_dlpack(tensor_list.as_tensor())


def dali_batches(source: ClipSource, rank_slice: RankSlice, device: torch.device) -> Iterator[dict]:
    """Batches of normalised clips (B, T, 3, H, W) float32 on `device`, in stream order."""
    with_labels = source.cfg.masks.objects > 0 and source.shards.has_masks
    device_id = device.index if device.type == "cuda" else None
    if device.type == "cuda" and device_id is None:
        device_id = torch.cuda.current_device()
    pipe = build_pipeline(source, rank_slice, device_id, with_labels)
    try:
        while True:
            outs = pipe.run()
            batch = {
                "frames": _to_torch(outs[0]),
                "positions": _to_torch(outs[1]).view(-1).tolist(),
            }
            if with_labels:
                batch["labels"] = list(_to_torch(outs[2]).unbind(0))
            if source.conditioning is not None:
                batch["cached"] = [_to_torch(o) for o in outs[2 + int(with_labels):]]
            yield batch
    finally:
        del pipe
