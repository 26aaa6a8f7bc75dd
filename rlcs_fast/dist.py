"""Process-group plumbing for torchrun (NCCL on GPU, gloo on CPU) that degrades to a no-op single process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init(device: str, timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; returns (rank, world_size, device).

    `timeout_s` (`run.collective_timeout_s`) bounds how long a rank waits in one collective before the
    job fails; see the README's Faults section for how it was chosen."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = \"cuda\" but no CUDA device is visible: use \"auto\" or \"cpu\".")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return rank, world, dev


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce; returns the tensor for chaining. `op` in sum | max | min."""
    if is_dist():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(*, wait: bool = True) -> None:
    """Tear the group down together (`wait`): a gloo rank that destroys its group while a peer is still
    working can abort in gloo's transport thread ("terminate called without an active exception").
    After an error, `wait=False`: the peers may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
