"""Model loading, the packed policy wrapper, FSDP2 sharding, activation checkpointing and HF export."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from . import dist
from .attention import apply_attention, select_attention
from .checkpoint import fsync_tree
from .families import family_for
from .hub import resolve_model_path  # noqa: F401  (the entry points' import)
from .packing import PackedBatch, forward_hidden
from .trainer_utils import full_tensor

log = logging.getLogger("rlcs_fast")


def load_processor(path: str, *, min_pixels: int, max_pixels: int):
    processor = AutoProcessor.from_pretrained(path)
    ip = processor.image_processor
    # images are pre-resized with the same bounds (data.py), so the processor's own resize is the
    # identity; the bounds are set here too so that a raw image fed to it elsewhere gets the same tokens
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


def load_model(path: str, *, attention: str = "auto", device: torch.device | str = "cpu",
               freeze_vision: bool = False,
               dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, str]:
    """The HF model with the packed attention backend installed: float32 master weights for training, the
    compute dtype for a frozen model (the reference); ``freeze_vision`` freezes the ViT (patch embedding
    and blocks), never the mergers. The model class is the family's (``config.json``'s model_type)."""
    try:
        config = AutoConfig.from_pretrained(path)
        family = family_for(config)
        model = family.model_class().from_pretrained(path, config=config, dtype=dtype)
    except OSError as e:
        raise OSError(f"model.path = {path!r} could not be loaded ({e}); give a local Hugging Face "
                      "directory, "
                      "a hub id reachable from this machine, or \"tiny\".") from e
    backend = apply_attention(model, select_attention(attention))
    if freeze_vision:
        # ViT blocks and patch embedding only: the merger (ms-swift's "aligner") keeps training, as in the
        # recipe's `swift sft --freeze_aligner false` with freeze_vit's default
        for name, p in model.model.visual.named_parameters():
            if not name.startswith(family.vision_frozen_prefixes()):
                p.requires_grad_(False)
    return model.to(device), backend


class Policy(nn.Module):
    """Packed forward from tokens to a loss computed by a fused head kernel.

    The head (lm_head, possibly tied to the embeddings) is used inside this module's forward so that,
    sharded with FSDP2 as the root, its parameters are gathered and its gradients reduced like any other.
    `head_fn(hidden [N, H], weight [V, H]) -> anything` receives the final hidden states of the tokens
    selected by `index` (default: the loss positions of the batch)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, head_fn: Callable, index: torch.Tensor | None = None):
        hidden = forward_hidden(self.model, batch)  # [L, H]
        if index is None:
            index = batch.loss_index
            if index is None:
                index = batch.loss_mask.nonzero().squeeze(-1)
        hidden, weight = hidden.index_select(0, index), self.model.lm_head.weight  # [N, H], [V, H]
        if torch.is_autocast_enabled(hidden.device.type):
            # autocast keeps the residual stream (so the final norm's output) and the master weight in
            # fp32, and it does not reach into the Triton head: its dots would run in fp32, without
            # tensor cores (about 10x slower). Under FSDP2's MixedPrecisionPolicy both are bf16 already.
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return head_fn(hidden, weight)


def apply_activation_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_cpu_offload(cpu_offload: bool, device: torch.device) -> None:
    """`model.cpu_offload` maps to FSDP2's CPUOffloadPolicy, which needs an accelerator: its sharded
    parameters, gradients and optimizer states live in (pinned) CPU memory and are copied to the GPU
    for each layer's forward and backward."""
    if cpu_offload and device.type != "cuda":
        from .config import ConfigError

        raise ConfigError("config key `model.cpu_offload` = true needs a CUDA device, but this run is on "
                          f"{device.type}: "
                          "set `--model.cpu_offload false` (on the CPU the model is in CPU memory already).")


def _offload_mesh():
    """The device mesh for offloaded shards: gradients and AdamW states are CPU DTensors, and their
    collectives (the global grad norm in clipping) need a CPU backend, which an NCCL-only group lacks;
    torchtitan uses the same "cuda:nccl,cpu:gloo" group for CPU offload. One process gets a one-rank
    group of its own (FSDP2 needs a mesh even for a single GPU)."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import DeviceMesh

    backend = "cuda:nccl,cpu:gloo"
    if tdist.is_initialized():
        group = tdist.new_group(backend=backend)  # collective: every rank builds its policy at the same point
    else:
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1,
                                 device_id=torch.device("cuda", torch.cuda.current_device()))
        group = tdist.group.WORLD
    return DeviceMesh.from_group(group, "cuda")


def apply_fsdp(policy: Policy, *, mixed_precision: bool, cpu_offload: bool = False,
               reshard_root: bool = False) -> Policy:
    """FSDP2: one shard group per decoder layer and per vision block, the rest (embeddings, head, norm,
    merger) in the root. On CPU (gloo) parameters stay float32. `cpu_offload` keeps shards, gradients
    and the optimizer step on the CPU (FSDP2's CPUOffloadPolicy), for the 7B on small GPUs; it works on
    one process too (a one-process group is started for the device mesh).

    fully_shard moves each group's parameters to the GPU, shards them, then (offload) moves the shards
    to the CPU, one group at a time, so load the model on the CPU: the GPU never holds all of it.

    `reshard_root`: free the root's gathered parameters after each forward, for a model that runs no
    backward (the reference); a trained policy keeps them for the backward that follows at once."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw, vision_kw = {}, {}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # the blocks' floating inputs are the rotary cos/sin tables (their hidden states are bf16 already
        # from the patch embedding): cast to bf16 they would put the trainer's image positions off
        # vLLM's, which keeps them in fp32
        vision_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                      cast_forward_inputs=False)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
        kw["mesh"] = _offload_mesh()
    vision_units, text_units = family_for(policy.model.config).fsdp_units(policy.model)
    for block in vision_units:
        fully_shard(block, **(kw | vision_kw))
    for layer in text_units:
        fully_shard(layer, **kw)
    fully_shard(policy, reshard_after_forward=reshard_root, **kw)
    return policy


def hf_weight_names(model: PreTrainedModel) -> dict[str, str]:
    """State-dict name → the name `save_pretrained` writes to disk, in state-dict order, tied aliases left
    out.

    transformers 5 names modules `model.language_model.*` / `model.visual.*` but writes checkpoints in
    the original layout (`model.*`, `visual.*`) that the public Qwen2.5-VL repos and vLLM use; its own
    reverse mapping is applied here to shape-only (meta) tensors, so no weight is touched. A tied head
    (`lm_head.weight` sharing the embedding's parameter, the 3B) is not written, as `save_pretrained`
    does: `from_pretrained` and vLLM tie it again from `tie_word_embeddings`."""
    from transformers.core_model_loading import revert_weight_conversion

    sd = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {target for target, source in tied.items()
            if target in sd and model.get_parameter(target) is model.get_parameter(source)}
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items() if k not in drop}
    by_id = {id(t): k for k, t in shapes.items()}
    disk = revert_weight_conversion(model, dict(shapes))
    assert len(disk) == len(shapes) and all(id(t) in by_id for t in disk.values()), (
        "the checkpoint conversion of this model is not a pure renaming; streaming export cannot write it",
        sorted(disk)[:5])
    renamed = {by_id[id(t)]: name for name, t in disk.items()}
    return {k: renamed[k] for k in shapes}


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return [s for s in shards if s]


def export_hf(policy: Policy, processor, out_dir: str | Path, *, max_shard_bytes: int = 2 * 2**30) -> Path:
    """A Hugging Face directory (safetensors + config + processor) that transformers and vLLM load.

    Streamed: parameters are gathered one at a time on every rank (FSDP2 all-gather); rank 0 keeps at
    most one shard (<= `max_shard_bytes`) in CPU memory, writes it and drops it, and writes the
    `model.safetensors.index.json` that `save_pretrained` would when there are several shards.

    Atomic: everything goes to `<out>.tmp` (fsynced), then the old `<out>` is renamed away, `<out>.tmp`
    renamed into place and the old one removed. Stale `<out>.tmp` / `<out>.old` folders from a process
    killed during an earlier export are removed first; a killed export leaves no `<out>`-named partial
    folder, and the stage is not marked done, so the next run exports again."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    model = policy.model
    main = dist.rank() == 0
    if main:
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    names = hf_weight_names(model)
    sd = model.state_dict()
    sizes = {k: sd[k].numel() * sd[k].element_size() for k in names}
    shards = plan_shards(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(files, shards):
        tensors: dict[str, torch.Tensor] = {}
        for name in shard:
            full = full_tensor(sd[name])  # a collective: every rank, same order
            if main:
                tensors[names[name]] = full.cpu().contiguous()
            del full
        if main:
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    if main:
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values()),
                                  "total_parameters": sum(sd[k].numel() for k in names)},
                     "weight_map": {names[k]: f for f, shard in zip(files, shards) for k in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2,
                                                                         sort_keys=True) + "\n")
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        config.dtype = str(sd[next(iter(names))].dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        fsync_tree(tmp)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        fsync_tree(out_dir.parent, recursive=False)  # make the renames durable
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out_dir
