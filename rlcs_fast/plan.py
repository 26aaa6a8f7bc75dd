"""The run plan that ``python -m rlcs_fast.train --cfg FILE --dry-run`` prints: what a config will do,
checked and sized before any GPU time is spent.

- Model: the architecture read from the model's ``config.json`` only (no weights are loaded), with the
  parameter count computed from the config (:func:`count_params`, equal to the instantiated model's).
- Data: each table the stages read, its columns and first row when reachable; an unreachable hub or a
  missing column is reported with the config key to change.
- Batches: prompts and responses per step, optimizer updates per step, micro-batch token budget, steps
  per epoch.
- Memory per GPU (all numbers in GiB = 2**30 bytes): :func:`micro_step_bytes` counts what one micro-step
  allocates (sharded master parameters and gradients; FSDP2's gathered units and root, the root's
  gradients and reduce-scatter input; the fused head's buffers; the tied embedding's backward;
  activations), checked on the CPU against a measured peak of live tensors at the 3B width
  (``tests/test_memory_plan.py``). Activations of one micro-batch at the token budget ``T``: a decoder
  layer keeps about ``8·H + 2·kv_dim + 4·I`` values per token for backward, a vision block about
  ``8·H_v + 4·I_v`` per patch; with activation checkpointing only each layer's input (``H`` per token)
  is kept, plus one layer's full set while it is recomputed. Image patches per micro-batch: the budget
  times the image share of the longest sequence (``max_pixels / (patch·merge)²`` merged tokens, 4 patches
  each; 28² for Qwen2.5-VL, 32² for Qwen3-VL).
  :func:`memory_plan` adds the AdamW states (2 × fp32, sharded), the reference model (compute dtype,
  sharded), 10% for the allocator's fragmentation, and vLLM while awake (GRPO; validation of either
  stage when ``rollout.engine = "vllm"``): bf16 weights (2 B/param over the tensor-parallel size) and
  the KV cache in the rest of ``rollout.gpu_memory_utilization`` × GPU memory; KV bytes per token
  ``2·layers·kv_heads·head_dim·2``. The trainer's cached blocks are released before each wake.
  Not modelled: the CUDA context and NCCL buffers (budget ~1-3 GiB), and the image processor's host memory.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ConfigError

GIB = 2**30
DEFAULT_GPU_GIB = 80.0  # H100 / A100-80G, when no GPU is visible to size the plan against


@dataclass(frozen=True)
class ModelArch:
    """What the plan needs of a model's config (any family in ``rlcs_fast.families``)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_out: int
    patch_size: int
    merge_size: int
    text_params: int
    vision_params: int
    merger_params: int = 0  # trained even with model.freeze_vision
    layer_params: int = 0  # one decoder layer (an FSDP2 unit)
    block_params: int = 0  # one vision block (an FSDP2 unit)

    @property
    def merged_patch_pixels(self) -> int:
        """Pixels one merged image token covers: 28² for Qwen2.5-VL (patch 14), 32² for Qwen3-VL (16)."""
        return (self.patch_size * self.merge_size) ** 2

    @property
    def total_params(self) -> int:
        return self.text_params + self.vision_params

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be used ("" when it can): ``HF_HUB_OFFLINE`` is set, or one HEAD
    request to the endpoint fails within a few seconds. Asked once per process, so an unreachable hub
    costs the dry run one short probe instead of the library's retries with back-off for every file
    (about 110 s for a model and two sets)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:  # the hub library's own HTTP client: proxies, certificates and test transports apply
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # any transport failure (DNS, refused, timeout, TLS) means: not reachable
        return f"{constants.ENDPOINT} did not answer within {HUB_PROBE_TIMEOUT_S:.0f} s ({type(e).__name__})"
    return ""


def load_model_config(path: str, *, key: str = "model.path"):
    """The model's config (``config.json`` only, never weights): a local directory, a hub id (from the
    local cache only when the hub is unreachable), or ``"tiny"``."""
    from .families import family_by_tiny_name

    if (family := family_by_tiny_name(path)) is not None:
        return family.tiny_config()
    from transformers import AutoConfig

    offline = "" if os.path.isdir(os.path.expanduser(path)) else hub_unreachable()
    try:
        return AutoConfig.from_pretrained(path, local_files_only=bool(offline))
    except (OSError, ValueError) as e:
        if offline:
            raise ConfigError(f"config key `{key}` = {path!r}: not a local directory, not in the local "
                              f"cache, and the hub is unreachable ({offline}). Give a local Hugging Face "
                              "directory, or run where the hub is reachable.") from e
        raise ConfigError(f"config key `{key}` = {path!r}: could not read its config.json "
                          f"({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Give a local Hugging Face "
                          "directory, a "
                          "hub id reachable from this machine, or \"tiny\".") from e


def count_params(config) -> tuple[int, int]:
    """(text, vision) parameter counts of the model ``config`` describes, tied embeddings counted once:
    the family's count, which mirrors transformers' module shapes (``rlcs_fast.families``)."""
    from .families import family_for

    return family_for(config).count_params(config)


def merger_params(config) -> int:
    """Parameters of the vision mergers (trained even with ``model.freeze_vision``)."""
    from .families import family_for

    return family_for(config).merger_params(config.vision_config)


def model_arch(config) -> ModelArch:
    from .families import family_for

    t, v = config.text_config, config.vision_config
    text, vision = count_params(config)
    layer, block = family_for(config).unit_params(config)
    return ModelArch(
        model_type=config.model_type, layers=t.num_hidden_layers, hidden=t.hidden_size,
        heads=t.num_attention_heads, kv_heads=t.num_key_value_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        intermediate=t.intermediate_size, vocab=t.vocab_size, tied=bool(config.tie_word_embeddings),
        vision_depth=v.depth, vision_hidden=v.hidden_size, vision_heads=v.num_heads,
        vision_intermediate=v.intermediate_size, vision_out=v.out_hidden_size, patch_size=v.patch_size,
        merge_size=v.spatial_merge_size, text_params=text, vision_params=vision,
        merger_params=merger_params(config), layer_params=layer, block_params=block)


# --- data ----------------------------------------------------------------------------------------------

@dataclass
class DataCheck:
    key: str  # the config key that names the source, e.g. "data.train"
    source: str
    split: str
    ok: bool
    columns: list[str] = field(default_factory=list)
    rows: int | None = None  # None: not known without downloading the whole set
    first_row: dict[str, str] = field(default_factory=dict)  # column -> short description
    error: str = ""


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:80] + ("…" if len(value) > 80 else ""))
    if isinstance(value, list):
        return f"list of {len(value)}" + (f" ({_describe(value[0])} …)" if value else "")
    if isinstance(value, dict):
        if "bytes" in value or "path" in value:
            return f"image ({len(value.get('bytes') or b'')} bytes)"
        return "dict with keys " + ", ".join(sorted(value))
    return type(value).__name__ + ("" if value is None else f" {str(value)[:40]}")


def check_data(source: str, split: str, *, key: str, kind: str, columns, seed: int = 0,
               synthetic_size: int = 0) -> DataCheck:
    """Load the table's schema and first row (a hub set is streamed, never downloaded whole) and check
    the configured columns. Never raises for an unreachable source: the result says what failed."""
    import datasets

    from .data import check_columns, load_table

    out = DataCheck(key, source, split, ok=False)
    try:
        is_hub = source != "synthetic" and not os.path.exists(os.path.expanduser(source))
        if is_hub and source.count("/") == 1 and not source.startswith((".", "/")):
            if offline := hub_unreachable():
                raise ConfigError(f"config key `{key}` = {source!r}: the hub is unreachable ({offline}). "
                                  "Use a local parquet/JSONL path, or run where the hub is reachable.")
            try:
                ds = datasets.load_dataset(source, split=split, streaming=True)
                first = next(iter(ds.take(1)), None)
            except Exception as e:  # any failure of the hub or of the files behind it
                raise ConfigError(f"config key `{key}` = {source!r}: the hub is unreachable or the split "
                                  f"{split!r} does not exist ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}). "
                                  "Use a local parquet/JSONL path, or run where the hub is reachable.") from e
            out.columns = list(first.keys()) if first is not None else list(ds.column_names or [])
            info = ds.info.splits.get(split) if ds.info and ds.info.splits else None
            out.rows = info.num_examples if info is not None and info.num_examples else None
        else:
            ds = load_table(source, split, kind=kind, seed=seed, synthetic_size=synthetic_size, key=key)
            out.columns, out.rows = list(ds.column_names), len(ds)
            from .data import lazy_images

            ds = lazy_images(ds, columns.images)
            first = ds[0] if len(ds) else None
        if first is not None:
            out.first_row = {c: _describe(first[c]) for c in out.columns}

        class _Names:  # check_columns only reads column_names
            column_names = out.columns

        check_columns(_Names, columns, source=source)
        out.ok = True
    except ConfigError as e:
        out.error = str(e)
    return out


# --- batches and memory --------------------------------------------------------------------------------

def batch_plan(cfg: Config, stage: str, world: int, train_rows: int | None) -> dict[str, Any]:
    if stage == "sft":
        s = cfg.sft
        steps_per_epoch = math.ceil(train_rows / s.global_batch_size) if train_rows else None
        steps = s.steps or (math.ceil(s.epochs * steps_per_epoch) if steps_per_epoch else None)
        return {"sequences per step": s.global_batch_size,
                "sequences per rank per step": math.ceil(s.global_batch_size / world),
                "optimizer updates per step": 1, "micro-batch token budget": s.max_tokens_per_microbatch,
                "max tokens per sequence": cfg.data.max_length, "steps per epoch": steps_per_epoch,
                "steps": steps,
                "epochs": s.epochs if not s.steps
                else (s.steps / steps_per_epoch if steps_per_epoch else None)}
    g = cfg.grpo
    steps_per_epoch = math.ceil(train_rows / g.rollout_batch_size) if train_rows else None
    return {"prompts per step": g.rollout_batch_size, "responses per step": g.rollout_batch_size * g.n,
            "prompts per rank per step": math.ceil(g.rollout_batch_size / world),
            "optimizer updates per step": g.epochs * (g.rollout_batch_size // g.mini_batch_size),
            "responses per update": g.mini_batch_size * g.n,
            "micro-batch token budget": g.max_tokens_per_microbatch,
            "max tokens per sequence": g.max_prompt_length + g.max_response_length,
            "steps per epoch": steps_per_epoch, "steps": g.steps,
            "epochs": g.steps / steps_per_epoch if steps_per_epoch else None}


def _units(arch: ModelArch) -> tuple[int, int]:
    """(parameters of the largest non-root FSDP2 unit: a decoder layer or a vision block, parameters of the
    root: embeddings, head, final norm, patch embedding, position table and mergers), as
    ``model.apply_fsdp`` groups them."""
    root = arch.total_params - arch.layers * arch.layer_params - arch.vision_depth * arch.block_params
    return max(arch.layer_params, arch.block_params), root


def head_chunk(tokens: int, vocab: int) -> int:
    """Tokens per head chunk, as the fused kernels choose it (``default_chunk_size``)."""
    target = max(128, (1 << 29) // max(vocab, 1))
    return min(max(tokens, 1), 1 << (target.bit_length() - 1))


def micro_step_bytes(arch: ModelArch, *, stage: str, world: int, tokens: int, patches: float,
                     loss_tokens: int, compute_bytes: int, grad_ckpt: bool,
                     trainable: int) -> dict[str, float]:
    """Bytes by component of one micro-step (forward + backward, no optimizer states), and its peak.

    What the code allocates (a test measures it on the CPU at 3B width with a TorchDispatchMode):
    - sharded fp32 master parameters and, at the end of backward, fp32 gradients (4 B each, / world);
    - under FSDP2 (world > 1): two gathered 16-bit units (current + prefetch); the root (embeddings, head,
      merger) stays gathered from forward to backward; in backward its unsharded gradients (param dtype)
      and their fp32 copy that the reduce-scatter reads;
    - the fused head: an fp32 dW accumulator [V, H] and a 16-bit dlogits chunk; GRPO's fused loss also
      keeps the fp32 logits of the chunk and saves dW in the weight's dtype for backward (a second
      [V, H] when that dtype is bf16);
    - tied embeddings (3B): the embedding's backward makes a dense [V, H] gradient, and accumulating it
      into the head's gradient makes a third [V, H] for a moment;
    - activations of the micro-batch (see the module docstring) in the compute dtype.
    Peak: the larger of the head's moment (all activations held, the head's buffers) and the end of
    backward (gradients, the embedding's accumulation, the root's reduce-scatter input)."""
    cb = compute_bytes
    fsdp = world > 1
    grad_bytes = cb if fsdp else 4  # FSDP2's unsharded gradients are in the param dtype; else fp32 masters
    unit, root = _units(arch)
    vh = arch.vocab * arch.hidden
    out = {"parameters (fp32 master, sharded)": 4 * arch.total_params / world,
           "gradients (fp32, sharded)": 4 * trainable / world,
           "all-gathered units (current + prefetch)": 2 * cb * unit if fsdp else 0.0,
           "FSDP root, gathered (forward to backward)": cb * root if fsdp else 0.0}
    per_layer = tokens * (8 * arch.hidden + 2 * arch.kv_dim + 4 * arch.intermediate) * cb
    per_block = patches * (8 * arch.vision_hidden + 4 * arch.vision_intermediate) * cb
    full = arch.layers * per_layer + arch.vision_depth * per_block + tokens * arch.hidden * cb
    ckpt = (arch.layers * tokens * arch.hidden * cb + arch.vision_depth * patches * arch.vision_hidden * cb
            + max(per_layer, per_block) + tokens * arch.hidden * cb)
    out["activations, no checkpointing"] = full
    out["activations, checkpointing"] = ckpt
    chunk = head_chunk(loss_tokens, arch.vocab)
    head = 4 * vh + chunk * arch.vocab * cb + loss_tokens * arch.hidden * cb  # dW fp32, dlogits, dh
    if stage == "grpo":
        head += chunk * arch.vocab * 4 + (vh * cb if cb != 4 else 0)  # fp32 logits; dW saved in weight dtype
    out["fused head (dW fp32, dlogits chunk)"] = head
    tied = 2 * grad_bytes * vh if arch.tied else 0.0
    out["tied embedding backward (dense grad + sum)"] = tied
    out["FSDP root gradients + reduce-scatter input"] = (grad_bytes + 4) * root if fsdp else 0.0
    state = sum(out[k] for k in ("parameters (fp32 master, sharded)",
                                 "all-gathered units (current + prefetch)",
                                 "FSDP root, gathered (forward to backward)"))
    acts = ckpt if grad_ckpt else full
    # unsharded (world 1): the gradients are the full fp32 ones, complete at the end of backward
    grads = out["gradients (fp32, sharded)"]
    at_head = acts + head
    at_end = grads + max(tied, out["FSDP root gradients + reduce-scatter input"])
    out["micro-step peak"] = state + max(at_head, at_end)
    return out


def memory_plan(arch: ModelArch, cfg: Config, stage: str, world: int, gpu_gib: float) -> dict[str, float]:
    """Per-GPU GiB by component (see the module docstring and :func:`micro_step_bytes`)."""
    trainable = arch.total_params - (arch.vision_params - arch.merger_params
                                     if cfg.model.freeze_vision else 0)
    if stage == "sft":
        budget, seq_len = cfg.sft.max_tokens_per_microbatch, cfg.data.max_length
    else:
        budget = cfg.grpo.max_tokens_per_microbatch
        seq_len = cfg.grpo.max_prompt_length + cfg.grpo.max_response_length
    image_tokens = min(cfg.data.max_pixels // arch.merged_patch_pixels, seq_len)
    patches = budget * image_tokens / seq_len * arch.merge_size**2
    cb = 4 if cfg.model.dtype == "float32" else 2
    step = micro_step_bytes(arch, stage=stage, world=world, tokens=budget, patches=patches,
                            loss_tokens=budget, compute_bytes=cb, grad_ckpt=cfg.model.gradient_checkpointing,
                            trainable=trainable)
    peak = step.pop("micro-step peak")
    out = dict(step)
    out["AdamW states (2 x fp32, sharded)"] = 8 * trainable / world
    if stage == "grpo" and cfg.grpo.kl_coef > 0:
        out["reference model (bf16, sharded)"] = cb * arch.total_params / world
    out = {k: v / GIB for k, v in out.items()}
    extra = out["AdamW states (2 x fp32, sharded)"] + out.get("reference model (bf16, sharded)", 0.0)
    # the caching allocator keeps freed blocks for reuse; reserved exceeds allocated by the
    # fragmentation of blocks split for other sizes, ~10% of the peak (not measurable on the CPU)
    slack = out["allocator fragmentation (10% of the peak)"] = 0.1 * (peak / GIB + extra)
    out["training peak (state + chosen activations)"] = peak / GIB + extra + slack
    state = (out["parameters (fp32 master, sharded)"] + out["gradients (fp32, sharded)"] + extra)
    if stage == "grpo" or cfg.rollout.engine == "vllm":
        r = cfg.rollout
        weights = 2 * arch.total_params / r.tensor_parallel_size / GIB
        pool = r.gpu_memory_utilization * gpu_gib
        kv_per_token = 2 * arch.layers * arch.kv_dim * 2 / r.tensor_parallel_size
        out["vLLM weights (bf16)"] = weights
        out["vLLM KV cache"] = max(pool - weights, 0.0)
        out["vLLM KV tokens that fit"] = max(pool - weights, 0.0) * GIB / kv_per_token
        # the trainer's cached blocks are released before every wake (trainer_utils.release_cached_memory)
        out["awake: sharded training state + vLLM pool"] = state + pool
    return out


def world_size() -> int:
    """The ranks the run will use: torchrun's WORLD_SIZE, else the visible GPUs, else 1."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    import torch

    return max(torch.cuda.device_count(), 1)


def gpu_memory_gib() -> tuple[float, bool]:
    """(GiB per GPU, measured?) of the first visible GPU, else the 80 GiB assumption."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB, True
    return DEFAULT_GPU_GIB, False


# --- the whole plan ------------------------------------------------------------------------------------

@dataclass
class Plan:
    arch: ModelArch | None
    model_error: str
    data: list[DataCheck]
    batches: dict[str, dict[str, Any]]
    memory: dict[str, dict[int, dict[str, float]]]  # stage -> world -> component -> GiB
    world: int
    gpu_gib: float
    gpu_measured: bool
    model_dir: str = ""  # the local directory model.path resolves to ("" when it does not)
    preflight: list[str] = field(default_factory=list)  # the launch preflight's problems

    @property
    def ok(self) -> bool:
        return self.arch is not None and all(d.ok for d in self.data) and not self.preflight


def preflight_model(cfg: Config) -> tuple[str, list[str]]:
    """The launch preflight the trainer runs before loading weights (:mod:`rlcs_fast.preflight`), on the
    model's small files only: a hub id from the cache, or its config and tokenizer files downloaded."""
    from .hub import is_hub_id, snapshot_dir
    from .preflight import preflight

    path = cfg.model.path
    try:
        if path == "tiny":
            from .tiny import tiny_path

            model_dir = str(tiny_path(seed=cfg.model.tiny_seed))
        elif is_hub_id(path):
            model_dir = snapshot_dir(path, files_only=True, local_only=bool(hub_unreachable()))
        else:
            model_dir = os.path.expanduser(path)
    except ConfigError as e:
        return "", [str(e)]
    return model_dir, preflight(cfg, model_dir)


def build_plan(cfg: Config, *, world: int | None = None, gpu_gib: float | None = None) -> Plan:
    from .data import Columns

    world = world or world_size()
    measured = gpu_gib is not None
    if gpu_gib is None:
        gpu_gib, measured = gpu_memory_gib()
    arch, model_error = None, ""
    try:
        arch = model_arch(load_model_config(cfg.model.path))
    except ConfigError as e:
        model_error = str(e)
    d = cfg.data
    columns = Columns(d.image_column, d.problem_column, d.answer_column)
    checks, rows = [], {}
    for key, source, split, size in (("data.train", d.train, d.train_split, d.synthetic_train_size),
                                     ("data.val", d.val, d.val_split, d.synthetic_val_size)):
        kind = "sft" if cfg.run.stages == ["sft"] else "rl"
        c = check_data(source, split, key=key, kind=kind, columns=columns, seed=cfg.run.seed,
                       synthetic_size=size)
        checks.append(c)
        rows[key] = c.rows
    batches, memory = {}, {}
    worlds = sorted({1, 2, 4, 8, world})
    for stage in cfg.run.stages:
        batches[stage] = batch_plan(cfg, stage, world, rows["data.train"])
        if arch is not None:
            memory[stage] = {w: memory_plan(arch, cfg, stage, w, gpu_gib) for w in worlds}
    model_dir, problems = preflight_model(cfg) if arch is not None else ("", [])
    return Plan(arch, model_error, checks, batches, memory, world, gpu_gib, measured, model_dir, problems)


def _fmt(v: Any) -> str:
    if v is None:
        return "unknown (row count not in the hub's metadata)"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_plan(plan: Plan, cfg: Config) -> str:
    lines = [f"rlcs_fast dry run: stages {cfg.run.stages}, run.dir {cfg.run.dir!r}, world size {plan.world}"
             f" (WORLD_SIZE or visible GPUs), GPU memory {plan.gpu_gib:.0f} GiB"
             f"{'' if plan.gpu_measured else ' (assumed: no GPU visible)'}", ""]
    lines.append(f"== model: {cfg.model.path}")
    a = plan.arch
    if a is None:
        lines.append(f"  ERROR {plan.model_error}")
    else:
        lines += [
            f"  text: {a.layers} layers, hidden {a.hidden}, heads {a.heads} (kv {a.kv_heads}, head dim "
            f"{a.head_dim}), "
            f"MLP {a.intermediate}, vocab {a.vocab}, embeddings {'tied' if a.tied else 'untied'}",
            f"  vision: {a.vision_depth} blocks, hidden {a.vision_hidden}, heads {a.vision_heads}, MLP "
            f"{a.vision_intermediate}, patch {a.patch_size}, merge {a.merge_size}x{a.merge_size}, out "
            f"{a.vision_out}"
            f"{' (blocks frozen, merger trained)' if cfg.model.freeze_vision else ''}",
            f"  parameters (from the config): {a.total_params:,} = text {a.text_params:,} + vision "
            f"{a.vision_params:,}"
            f" ({a.total_params / 1e9:.2f}B)"]
    if a is not None:
        lines.append(f"  launch preflight ({plan.model_dir or 'not resolved'}): "
                     + ("ERROR" if plan.preflight
                        else "OK (token ids, chat template, pixel-norm constants, image limits)"))
        lines += [f"    - {p}" for p in plan.preflight]
    lines.append("")
    lines.append("== data")
    for c in plan.data:
        head = f"  {c.key} = {c.source!r} split {c.split!r}: "
        if not c.ok:
            lines.append(head + f"ERROR {c.error}")
            continue
        lines.append(head + f"{_fmt(c.rows)} rows, columns {c.columns}")
        for col, desc in c.first_row.items():
            lines.append(f"      first row {col}: {desc}")
    for stage, b in plan.batches.items():
        lines += ["", f"== batches ({stage})"]
        lines += [f"  {k}: {_fmt(v)}" for k, v in b.items()]
    for stage, by_world in plan.memory.items():
        lines += ["", f"== memory per GPU ({stage}), GiB, FSDP2 over N ranks; "
                      f"activation checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"]
        worlds = list(by_world)
        lines.append("  " + f"{'component':46s}"
                     + "".join(f"{'N=' + str(w) + ('*' if w == plan.world else ''):>12s}" for w in worlds))
        for comp in by_world[worlds[0]]:
            fmt = (lambda v: f"{v:12,.0f}") if "tokens" in comp else (lambda v: f"{v:12.2f}")
            lines.append(f"  {comp:46s}" + "".join(fmt(by_world[w][comp]) for w in worlds))
        mine = by_world[plan.world]
        peak = max(mine["training peak (state + chosen activations)"],
                   mine.get("awake: sharded training state + vLLM pool", 0.0))
        verdict = "fits" if peak < plan.gpu_gib * 0.95 else "DOES NOT FIT"
        lines.append(f"  => at N={plan.world}: peak {peak:.1f} of {plan.gpu_gib:.0f} GiB: {verdict}")
    lines += ["", "plan OK" if plan.ok else "plan has ERRORS (see above)"]
    return "\n".join(lines)
