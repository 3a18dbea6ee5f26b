"""The precomputed conditioning cache: what the frozen networks compute from the frames alone.

RAFT's flows between neighbouring frames, the clean frames' VAE posterior and the CLIP embedding do
not depend on the training mask; without crops, flips or colour jitter they are a pure function of
(video, frame, frame step, resolution), computed once by `tools/precompute_conditioning.py` instead
of at every step.

    format.py       the folder's layout, record shapes, manifest and index reading
    frames.py       a video's frames, decoded by the training loader's own backends
    compute.py      the frozen networks over whole videos; the weights' fingerprints
    writer.py       the tool's run: work units over ranks, atomic writes, resume, manifest
    verify.py       --verify
    reader.py       training: start-up checks, per-clip records in the reader processes, batched tensors
                    delivered with the batch as the clips' CleanClipFeatures (train/objective.py)
"""
