"""Model loading, the packed policy wrapper, FSDP2 sharding, activation checkpointing and HF export."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from . import dist
from .attention import apply_attention, select_attention
from .packing import PackedBatch, forward_hidden

log = logging.getLogger("rlcs_fast")


def resolve_model_path(path: str, *, tiny_seed: int = 0) -> str:
    """`"tiny"` → the offline tiny Qwen2.5-VL (built once into the cache); anything else as given."""
    if path == "tiny":
        from .tiny import tiny_path

        if dist.is_dist():  # one rank builds, the others wait, so they never race on the cache
            if dist.rank() == 0:
                tiny_path(seed=tiny_seed)
            dist.barrier()
        return str(tiny_path(seed=tiny_seed))
    return path


def load_processor(path: str, *, min_pixels: int, max_pixels: int):
    processor = AutoProcessor.from_pretrained(path)
    ip = processor.image_processor
    # images are pre-resized with the same bounds (data.py), so the processor's own resize is the
    # identity; the bounds are set here too so that a raw image fed to it elsewhere gets the same tokens
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


def load_model(path: str, *, attention: str = "auto", device: torch.device | str = "cpu",
               freeze_vision: bool = False) -> tuple[Qwen2_5_VLForConditionalGeneration, str]:
    """The HF model in float32 master weights, with the packed attention backend installed."""
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise OSError(f"model.path = {path!r} could not be loaded ({e}); give a local Hugging Face directory, "
                      "a hub id reachable from this machine, or \"tiny\".") from e
    backend = apply_attention(model, select_attention(attention))
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    return model.to(device), backend


class Policy(nn.Module):
    """Packed forward from tokens to a loss computed by a fused head kernel.

    The head (lm_head, possibly tied to the embeddings) is used inside this module's forward so that,
    sharded with FSDP2 as the root, its parameters are gathered and its gradients reduced like any other.
    `head_fn(hidden [N, H], weight [V, H]) -> anything` receives the final hidden states of the tokens
    selected by `index` (default: the loss positions of the batch)."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, head_fn: Callable, index: torch.Tensor | None = None):
        hidden = forward_hidden(self.model, batch)  # [L, H]
        if index is None:
            index = batch.loss_mask.nonzero().squeeze(-1)
        return head_fn(hidden.index_select(0, index), self.model.lm_head.weight)


def apply_activation_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp(policy: Policy, *, mixed_precision: bool) -> Policy:
    """FSDP2: one shard group per decoder layer and per vision block, the rest (embeddings, head, norm,
    merger) in the root. On CPU (gloo) parameters stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kw = {"mp_policy": mp} if mp is not None else {}
    inner = policy.model.model
    for block in inner.visual.blocks:
        fully_shard(block, **kw)
    for layer in inner.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(policy, reshard_after_forward=False, **kw)  # the root is needed again right away in backward
    return policy


def full_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on rank 0 (CPU), gathered tensor by tensor; empty on other ranks."""
    if not dist.is_dist():
        return {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.rank() == 0 else {}


def export_hf(policy: Policy, processor, out_dir: str | Path) -> Path:
    """A Hugging Face directory (safetensors + config + processor) that transformers and vLLM load,
    written to a temporary folder and renamed into place."""
    out_dir = Path(out_dir)
    sd = full_state_dict(policy)
    if dist.rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = policy.model
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    dist.barrier()
    return out_dir
