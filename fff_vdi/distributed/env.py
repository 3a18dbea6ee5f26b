"""Process-group set-up and the few collective decisions every rank must take together.

torchrun (or srun starting torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; a plain
`python launch/train.py` becomes a world of one on a free localhost port. The group always exists,
so one process trains through the same FSDP2, DTensor and DCP code as many. NCCL on CUDA, gloo on
the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600, device_type: Optional[str] = None) -> DistInfo:
    """Join the process group (if launched by torchrun) and pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "MASTER_ADDR" not in os.environ:  # not started by torchrun: a world of one
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        # Async error handling makes a hung collective raise on every rank after `timeout_s`
        # instead of blocking the job until Slurm's wall-clock limit.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def max_over_ranks(value: float, device: torch.device) -> torch.Tensor:
    """(1,) float32 on `device`: the largest `value` of any rank (stop, save and skip decisions). Made
    by a fill on the device and reduced there: reading it is the caller's one wait."""
    t = torch.full((1,), float(value), dtype=torch.float32, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
