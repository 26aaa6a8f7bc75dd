"""Pieces both stages share: the optimizer and schedule, the filler sample, gradient clipping, and the
weight stream to the rollout engine. Micro-batch planning is :mod:`rlcs_fast.schedule`'s."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

from .config import OptimConfig
from .packing import Sample, mrope_positions, smallest_image


def build_optimizer(model: nn.Module, optim: OptimConfig, *, lr: float, total_steps: int):
    """AdamW over the trainable parameters (`optim`'s settings at learning rate `lr`) and its warmup +
    cosine-or-constant schedule over `total_steps` optimizer steps."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no decay on norms and biases, as HF and verl do
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(optim.betas),
                            eps=optim.eps)
    warmup = int(round(optim.warmup_ratio * total_steps))
    if optim.schedule == "cosine":
        sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warmup,
                              num_training_steps=total_steps,
                              scheduler_specific_kwargs={"min_lr_rate": optim.min_lr_ratio})
    else:
        sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup)
    return opt, sched


def dummy_image_sample(model_config) -> Sample:
    """A 3-token sequence holding the smallest image (one merged token) and no targets.

    Under FSDP2 every rank must run the same modules: a micro-batch without images on one rank would
    skip the vision tower's all-gathers that the other ranks wait on. Added to such micro-batches, it
    keeps the collectives in step and contributes exactly zero loss and zero gradient."""
    ids = torch.tensor([model_config.vision_start_token_id, model_config.image_token_id,
                        model_config.vision_end_token_id])
    pixels, grid = smallest_image(model_config.vision_config)
    return Sample(input_ids=ids, target_mask=torch.zeros(3, dtype=torch.bool),
                  position_ids=mrope_positions(model_config, ids, grid), pixel_values=pixels,
                  image_grid_thw=grid)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a parameter or state-dict entry: a collective for an FSDP2 DTensor (every
    rank must call it, in the same order), the tensor itself otherwise.

    A shard offloaded to the CPU (FSDP2's CPUOffloadPolicy) is first copied to the mesh's device:
    NCCL cannot all-gather CPU tensors."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach()
    mesh_device = t.device_mesh.device_type
    if t.device.type != mesh_device:
        t = t.to(mesh_device)
    return t.full_tensor().detach()


def iter_full_weights(model: nn.Module,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) one parameter at a time, in `model.state_dict()` order.

    Names are the HF module's own (`model.language_model.layers.0...`): FSDP2's `fully_shard` and
    transformers' gradient checkpointing swap parameters in place and wrap no module, so no
    `_fsdp_wrapped_module` / `_checkpoint_wrapped_module` prefix appears (a test checks it).

    Memory: a generator, so nothing is gathered before the consumer asks for it. Under FSDP2 each step
    all-gathers one parameter on every rank (the same order on all ranks keeps the collectives in
    step) and drops the float32 full copy before yielding the cast one; once the consumer lets go of a
    yielded tensor, the peak extra memory is that of one full tensor (the largest is the embedding,
    V x H). The consumer must not hold on to the tensors (vLLM's `load_weights` copies each into its
    own buffers), and every rank must drain the generator (an abandoned one leaves the other ranks
    waiting in an all-gather)."""
    for name, t in model.state_dict().items():
        full = full_tensor(t)
        if dtype is not None and full.dtype != dtype:
            full = full.to(dtype)  # the float32 gather is freed here, before the yield
        yield name, full
        del full  # otherwise it stays alive during the next all-gather: two full tensors at once


_allocator_releases = 0


def release_cached_memory() -> None:
    """Give the trainer's cached allocator blocks back to the driver before a co-located vLLM wakes.

    vLLM maps its weights and KV cache outside torch's caching allocator; after an update the cache still
    holds the training step's peak (activations, gathered shards, logits chunks), so a wake without this
    runs out of memory at step 2 (TRL and EasyR1 do the same before waking). `gc` first: a tensor kept
    alive only by a reference cycle holds its block. Counted, so that the fake engine can check it ran
    before every wake."""
    global _allocator_releases
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _allocator_releases += 1


def allocator_releases() -> int:
    """How many times this process released the allocator cache (see `release_cached_memory`)."""
    return _allocator_releases


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)
    except ImportError:
        return 0.0


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()
