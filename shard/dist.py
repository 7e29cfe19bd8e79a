"""Tensor-parallel process group: rank, size and the three collectives the model needs.

With one rank no process group exists and every collective is the identity, so the same
model code runs unsharded in tests.
"""

from datetime import timedelta

import torch
import torch.distributed as dist

_rank, _size = 0, 1


def init(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device) -> None:
    """Join the group of `world_size` shards (NCCL on CUDA, gloo on CPU)."""
    global _rank, _size
    _rank, _size = rank, world_size
    if world_size == 1:
        return
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=10),
    )


def shutdown() -> None:
    """Leave the group. gloo's threads must be joined before the process exits, or C++ aborts
    it ("terminate called without an active exception", exit -6)."""
    global _rank, _size
    if _size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size = 0, 1


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks (the identity with one rank)."""
    return _all_reduce(x) if _size > 1 else x


@torch.library.custom_op("sluice::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """An opaque op, so that a compiled forward calls the process group as eager code does."""
    out = x.clone()
    dist.all_reduce(out)
    return out


@_all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's `x` along the last dim on rank 0; other ranks get None."""
    if _size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_size)] if _rank == 0 else None
    dist.gather(x.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=-1) if _rank == 0 else None


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Overwrite `x` on every rank with rank 0's value."""
    if _size > 1:
        dist.broadcast(x, src=0)
    return x
