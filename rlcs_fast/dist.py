"""Process-group plumbing for torchrun that degrades to a no-op single process.

The rule for collectives: on GPU the group is ``cuda:nccl,cpu:gloo`` (torchtitan's choice for the same
reason), so device tensors go through NCCL and the small host-side reductions of counts and statistics
through gloo; on CPU it is gloo. An NCCL-only group has no CPU backend and fails at the first CPU tensor
("No backend type associated with device type cpu"), which gloo-only tests never see. So every
collective of the trainer goes through this module, and with ``RLCS_DIST_CHECK=cuda`` (set by the test
suite) each one is checked against the backends that a CUDA run's group would have, on any machine.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

CHECK_ENV = "RLCS_DIST_CHECK"


def group_backend(use_cuda: bool) -> str:
    """The process group's backend string, per device type."""
    return "cuda:nccl,cpu:gloo" if use_cuda else "gloo"


def backend_devices(backend: str) -> set[str]:
    """Device types whose tensors a group started with `backend` can reduce."""
    if ":" not in backend:  # a single backend for every device it supports
        return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}.get(backend, set())
    return {part.split(":")[0].strip() for part in backend.split(",")}


def check_collective(t: torch.Tensor, what: str) -> None:
    """With ``RLCS_DIST_CHECK=cuda``: refuse a tensor that the group of a CUDA run could not reduce."""
    simulated = os.environ.get(CHECK_ENV, "")
    if not simulated:
        return
    backend = group_backend(simulated == "cuda")
    if t.device.type not in backend_devices(backend):
        raise RuntimeError(f"{what} of a {t.device.type} tensor {tuple(t.shape)}: a {simulated} run's "
                           f"process group ({backend!r}) has no backend for {t.device.type} tensors")


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
        dist.init_process_group(group_backend(use_cuda), timeout=timedelta(seconds=timeout_s),
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
    check_collective(t, "all_reduce")
    if is_dist():
        dist.all_reduce(t,
                        op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def reduce_sums(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """All-reduce named host-side statistics in one float64 collective; returns them by the same names.

    One tensor for the whole dict (one collective, not one per value); reading the result by name
    means no metric can be mislabelled by a shifted position."""
    names = list(values)
    reduced = all_reduce(torch.tensor([float(values[k]) for k in names], dtype=torch.float64), op)
    return dict(zip(names, reduced.tolist()))


def all_gather_object(obj) -> list:
    """Every rank's `obj`, by rank (small Python objects: checkpoint manifests, skip counts)."""
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
