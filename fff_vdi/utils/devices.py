"""Host arrays to the GPU without a synchronisation."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.as_tensor(array, dtype=dtype, device=device)` without its wait on a CUDA device.

    A copy from pageable host memory made that way waits until the GPU has finished all queued work;
    in the data loader (mask plans drawn on the device) that stalled the host at every step while
    the GPU emptied its queue. Here the array goes through page-locked memory and is copied
    asynchronously (torch's host allocator keeps the page-locked block until the copy is done)."""
    device = torch.device(device)
    t = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
