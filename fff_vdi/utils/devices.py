"""Host arrays to the GPU without a synchronisation."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.as_tensor(array, dtype=dtype, device=device)` without its wait on a CUDA device.

    A blocking copy from host memory made that way returns only when the copy is done, so after all
    the work queued before it on the GPU: in the data loader (mask plans drawn on the device, while
    the previous step's update is still queued) the host would wait for the GPU at every step. Here
    the array goes through page-locked memory and is copied asynchronously (torch's host allocator
    keeps the page-locked block until the copy is done)."""
    device = torch.device(device)
    t = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
