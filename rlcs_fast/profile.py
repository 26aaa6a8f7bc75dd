"""Throughput and memory of one packed training step of Qwen2.5-VL-3B/7B on one GPU (and of a rollout, where
vLLM is installed), from random weights built with the released architectures; and the per-GPU memory plan.

    python -m rlcs_fast.profile --model 3b|7b|tiny [--layers K] [--tokens N] [--gpus 1] [--out FILE]
    python -m rlcs_fast.profile --plan --model 7b --gpus 8 --gpu-mem 80
    python -m rlcs_fast.profile --overhead --model 7b   (``rlcs_fast.overhead``: FLOPs, bytes, syncs)

A step is what the SFT stage runs (``rlcs_fast.sft``): one packed micro-batch of ``--tokens`` tokens
(sequences of ``--seq-len`` tokens, each with one image of ``--image-tokens`` merged tokens, the rest of the
sequence the answer the loss covers) → ``Policy`` forward to hidden states → fused log-prob head → backward
→ gradient clip + AdamW (fp32 master weights, bf16 autocast on a GPU, as the trainer). Each phase is timed
between device synchronisations; the first ``--warmup`` steps (Triton autotuning, allocator growth) are not
counted, then the median of ``--steps`` steps is reported with the peak of
``torch.cuda.max_memory_allocated``.

``--layers K`` builds only K of the decoder layers (the vision tower keeps its full depth), so that a model
whose fp32 AdamW state does not fit one GPU (7B: 16 B/param, 133 GB) can still be measured. The report then
measures a second model with one layer, fits time and memory linearly in the depth (a decoder layer's cost
does not depend on its index) and gives the full-depth figures as ``scaled_to_full_depth``, saying so.

MFU = 6 · parameters · tokens / step time / the device's dense bf16 peak (``--peak-tflops``, else a table of
known GPUs, else the bf16 ``torch.mm`` rate measured in the same run, and ``peak_source`` says which). The
6·P·T count includes the embeddings and the vision tower (whose FLOPs scale with patches, not tokens), and
leaves out attention's quadratic term: it is the customary approximation, not a FLOP count.

Every JSON this module or ``bench/`` writes carries :func:`environment` (device, versions, git revision).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# config.json of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (the values that set shapes).
RELEASED: dict[str, dict[str, Any]] = {
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "vision_out": 2048},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "vision_out": 3584},
}
# Both share the vision tower (675M parameters) and the special token ids of the Qwen2.5 tokenizer.
RELEASED_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                   "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
RELEASED_IDS = {"bos": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655,
                "video": 151656}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; matched on the device
# name.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0),
    ("RTX 4090", 165.2), ("B200", 2250.0),
]


def released_config(name: str, *, layers: int | None = None):
    """A ``Qwen2_5_VLConfig`` of the released 3B/7B architecture ("tiny": ``rlcs_fast.tiny``), optionally with
    only ``layers`` decoder layers."""
    if name == "tiny":
        from .tiny import tiny_config

        config = tiny_config()
    else:
        from transformers import Qwen2_5_VLConfig

        if name not in RELEASED:
            raise ValueError(f"--model {name!r}: expected one of tiny, {', '.join(RELEASED)}")
        r = RELEASED[name]
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=r["vocab_size"], hidden_size=r["hidden_size"],
                intermediate_size=r["intermediate_size"],
                num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
                num_key_value_heads=r["num_key_value_heads"], max_position_embeddings=128000,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]},
                tie_word_embeddings=r["tie_word_embeddings"], bos_token_id=RELEASED_IDS["bos"],
                eos_token_id=RELEASED_IDS["eos"], hidden_act="silu"),
            vision_config=dict(RELEASED_VISION, out_hidden_size=r["vision_out"], in_channels=3,
                               hidden_act="silu"),
            image_token_id=RELEASED_IDS["image"], video_token_id=RELEASED_IDS["video"],
            vision_start_token_id=RELEASED_IDS["vision_start"],
            vision_end_token_id=RELEASED_IDS["vision_end"], tie_word_embeddings=r["tie_word_embeddings"])
    if layers is not None:
        full = config.text_config.num_hidden_layers
        if not 1 <= layers <= full:
            raise ValueError(f"--layers {layers}: must be between 1 and the model's {full} layers")
        config.text_config.num_hidden_layers = layers
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[:layers]
    return config


# --- run metadata ----------------------------------------------------------------------------------------

def git_revision(repo: Path = REPO) -> str | None:
    """``<commit>`` (``+dirty`` when the tree has changes), or None outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What a result needs to be reproduced: device, versions and git revision."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers", "liger_kernel", "vllm", "flash_attn"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # not installed (any metadata error means the same to a reader)
            versions[pkg] = None
    env: dict[str, Any] = {"device": device_name(device), "device_type": device.type, "host": platform.node(),
                           "versions": versions, "git_revision": git_revision(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, device_memory_gib=round(p.total_memory / 2**30, 2),
                   sm=f"{p.major}{p.minor}", multiprocessors=p.multi_processor_count)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Best rate of a square ``torch.mm`` on ``device`` over ``reps`` runs (random data, never zeros): a
    ceiling, so the fastest run, not the median."""
    if device.type == "cpu":
        n, reps = 1024, 5
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


def peak_tflops(device: torch.device, override: float | None, dtype: torch.dtype) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"datasheet dense bf16 ({key})"
    source = f"measured torch.mm {str(dtype).removeprefix('torch.')} (device not in the table)"
    return matmul_tflops(device, dtype), source


# --- the step --------------------------------------------------------------------------------------------

def synthetic_batch(config, *, tokens: int, seq_len: int, image_tokens: int, seed: int = 0):
    """Packed random sequences filling ``tokens``: each holds one image of ``image_tokens`` merged tokens
    (a square-ish grid) after a short prompt, then answer tokens that the loss covers."""
    from .packing import Sample, mrope_positions, pack, patch_dim

    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    vocab = config.text_config.vocab_size
    merge = vc.spatial_merge_size
    rows = max(1, int(math.sqrt(image_tokens)))
    cols = max(1, image_tokens // rows)
    grid = torch.tensor([[1, rows * merge, cols * merge]])
    n_img = rows * cols
    patch_values = patch_dim(vc)
    prompt_len = 16
    # ordinary text ids only: a random special token (an extra <|image_pad|>) would break the image layout
    specials = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id, config.text_config.bos_token_id, config.text_config.eos_token_id]
    text_hi = min([vocab, 150000] + [t for t in specials if t is not None])
    samples, left = [], tokens
    while left > 0:
        length = min(seq_len, left)
        if length < prompt_len + n_img + 3:  # too short for an image: a text-only tail sequence
            ids = torch.randint(0, text_hi, (length,), generator=g)
            samples.append(Sample(ids, torch.ones(length, dtype=torch.bool),
                                  mrope_positions(config, ids, None)))
        else:
            text = torch.randint(0, text_hi, (length - n_img - 2,), generator=g)
            ids = torch.cat([text[:prompt_len], torch.tensor([config.vision_start_token_id]),
                             torch.full((n_img,), config.image_token_id),
                             torch.tensor([config.vision_end_token_id]), text[prompt_len:]])
            target = torch.zeros(length, dtype=torch.bool)
            target[prompt_len + n_img + 2:] = True
            pixels = torch.randn(n_img * merge**2, patch_values, generator=g)
            samples.append(Sample(ids, target, mrope_positions(config, ids, grid), pixels, grid.clone()))
        left -= length
    return pack(samples, vc)


def _build(config, device: torch.device, *, grad_ckpt: bool, seed: int):
    from .attention import apply_attention, select_attention
    from .config import OptimConfig
    from .families import family_for
    from .model import Policy, apply_activation_checkpointing
    from .trainer_utils import build_optimizer

    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).model_class()(config).float()
    backend = apply_attention(model, select_attention("auto"))
    if grad_ckpt:
        apply_activation_checkpointing(model)
    model.train()
    opt, _ = build_optimizer(model, OptimConfig(schedule="constant"), lr=1e-6, total_steps=1)
    return Policy(model), opt, backend


def profile_train(config, device: torch.device, *, tokens: int, seq_len: int, image_tokens: int, steps: int,
                  warmup: int, grad_ckpt: bool, kernels_impl: str, seed: int = 0) -> dict[str, Any]:
    """Times (s, median over ``steps``) of forward / backward / optimizer and peak memory of one packed
    step."""
    from .sft import sft_loss_fn
    from .trainer_utils import clip_grad_norm

    policy, opt, backend = _build(config, device, grad_ckpt=grad_ckpt, seed=seed)
    batch = synthetic_batch(config, tokens=tokens, seq_len=seq_len, image_tokens=image_tokens,
                            seed=seed).to(device)
    n_loss = int(batch.num_loss_tokens)
    head = sft_loss_fn(batch.targets[batch.loss_mask], 1.0 / max(n_loss, 1), kernels_impl)
    autocast = (torch.autocast("cuda",
                               dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    phase_peak = dict.fromkeys(phases, 0.0)  # GiB, max over the measured steps
    losses = []

    def mark(step: int, name: str | None) -> float:
        """Synchronise, note the peak of the phase that just ended, restart the peak; the host clock."""
        sync(device)
        if device.type == "cuda":
            if name is not None and step >= warmup:
                phase_peak[name] = max(phase_peak[name], torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats(device)
        return time.perf_counter()

    for step in range(warmup + steps):
        t0 = mark(step, None)
        with autocast:
            loss = policy(batch, head)
        t1 = mark(step, "forward")
        loss.backward()
        t2 = mark(step, "backward")
        clip_grad_norm(policy, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = mark(step, "optimizer")
        losses.append(float(loss.detach()))
        if step >= warmup:
            for times, t in zip(phases.values(), (t1 - t0, t2 - t1, t3 - t2)):
                times.append(t)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss in the profiled steps: {losses}")
    out = {name: statistics.median(v) for name, v in phases.items()}
    out["step"] = sum(out.values())
    params = sum(p.numel() for p in policy.parameters())
    if device.type == "cuda":
        mem = {"peak_gib": max(phase_peak.values()), "peak_gib_by_phase": phase_peak,
               "after_step_gib": torch.cuda.memory_allocated(device) / 2**30,
               "kind": "torch.cuda.max_memory_allocated over the measured steps; after_step: weights, "
                       "optimizer state and the batch"}
    else:  # no allocator statistics on the CPU: the process's peak resident set, imports included
        from .trainer_utils import peak_memory_gb

        mem = {"peak_gib": peak_memory_gb(device), "after_step_gib": None, "kind": "process max RSS (CPU)"}
    return {"time_s": out, "memory": mem, "parameters": params, "tokens": batch.num_tokens,
            "sequences": batch.num_seqs, "loss_tokens": n_loss, "losses": losses, "attention": backend}


def scale_to_depth(deep: dict[str, Any], shallow: dict[str, Any], k_deep: int, k_shallow: int,
                   full: int) -> dict[str, Any]:
    """Full-depth figures from measurements at two depths: value(L) = value(k) + (L − k) · per-layer slope."""

    def lin(a: float | None, b: float | None) -> tuple[float | None, float | None]:
        if a is None or b is None:
            return None, None
        slope = (a - b) / (k_deep - k_shallow)
        return a + (full - k_deep) * slope, slope

    times, per_layer = {}, {}
    for name in deep["time_s"]:
        times[name], per_layer[name] = lin(deep["time_s"][name], shallow["time_s"][name])
    peak, peak_slope = lin(deep["memory"]["peak_gib"], shallow["memory"]["peak_gib"])
    params, param_slope = lin(deep["parameters"], shallow["parameters"])
    return {"layers": full, "time_s": times, "per_layer_time_s": per_layer, "peak_memory_gib": peak,
            "per_layer_peak_memory_gib": peak_slope, "parameters": int(round(params)),
            "per_layer_parameters": int(round(param_slope)),
            "method": f"linear in depth from measured runs at {k_deep} and {k_shallow} decoder layers "
                      "(full vision tower in both); an estimate, not a measurement"}


def throughput(time_s: float, tokens: int, params: int, peak: float) -> dict[str, float]:
    flops = 6.0 * params * tokens
    return {"tokens_per_s": tokens / time_s, "model_tflops_per_step": flops / 1e12,
            "achieved_tflops": flops / time_s / 1e12, "mfu": flops / time_s / (peak * 1e12)}


# --- rollout (vLLM) --------------------------------------------------------------------------------------

@dataclass
class _Prompt:
    """A text-only ``rollout.engine.Request``."""

    prompt_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    images: list = field(default_factory=list)


def profile_rollout(config, device: torch.device, *, prompts: int, n: int, prompt_len: int, response_len: int,
                    gpu_memory_utilization: float, seed: int = 0) -> dict[str, Any]:
    """One GRPO rollout through ``VLLMEngine`` as the trainer drives it (wake → weight push → generate →
    sleep), on random text prompts (the image encoder is not included) and random weights pushed from a
    bf16 copy of the model. Times in s; generated tokens counted from the completions."""
    from .families import family_for
    from .rollout.engine import SamplingParams
    from .rollout.vllm_engine import VLLMEngine
    from .tiny import build_processor
    from .trainer_utils import iter_full_weights

    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).model_class()(config).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    requests = [_Prompt(torch.randint(0, 150000, (prompt_len,), generator=g)) for _ in range(prompts)]
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # config.json for the shapes (load_format="dummy": no weights on disk), and a processor so that vLLM
        # finds a tokenizer; prompts are token ids and detokenisation is off, so its vocabulary is unused
        config.save_pretrained(tmp)
        build_processor().save_pretrained(tmp)
        t0 = time.perf_counter()
        engine = VLLMEngine(tmp, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=prompt_len + response_len,
                            enable_prefix_caching=False, load_format="dummy", seed=seed, eos_token_id=None)
        times["init"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.wake_up()
        engine.load_weights(iter_full_weights(model, torch.bfloat16))
        sync(device)
        times["wake_and_weight_sync"] = time.perf_counter() - t0
        del model
        mem_awake = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        t0 = time.perf_counter()
        completions = engine.generate(requests,
                                      SamplingParams(n=n, temperature=1.0,
                                                     max_tokens=response_len, seed=seed))
        sync(device)
        times["generate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.sleep()
        sync(device)
        times["sleep"] = time.perf_counter() - t0
    generated = sum(len(c.response_ids) for c in completions)
    return {"time_s": times,
            "decoder_layers": config.text_config.num_hidden_layers,  # --layers: not full depth
            "prompts": prompts, "n": n, "prompt_len": prompt_len, "max_response_len": response_len,
            "generated_tokens": generated, "generate_tokens_per_s": generated / times["generate"],
            "memory_allocated_awake_gib": mem_awake}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


# --- memory plan -----------------------------------------------------------------------------------------

def plan_config_path(model: str, stage: str) -> Path | None:
    """The recipe config the plan sizes against (``configs/<stage>_<model>.toml``, ``configs/tiny.toml``)."""
    path = REPO / "configs" / ("tiny.toml" if model == "tiny" else f"{stage}_{model}.toml")
    return path if path.is_file() else None


def memory_budget(model: str, *, gpus: int, gpu_mem: float, tokens: int | None = None,
                  cfg_path: str | None = None) -> dict[str, Any]:
    """Per-GPU GiB by component for the SFT and GRPO stages (``rlcs_fast.plan.memory_plan``)."""
    from .config import load_config
    from .plan import memory_plan, model_arch

    arch = model_arch(released_config(model))
    out: dict[str, Any] = {"model": model, "gpus": gpus, "gpu_mem_gib": gpu_mem,
                           "parameters": arch.total_params, "stages": {}}
    for stage in ("sft", "grpo"):
        path = cfg_path or plan_config_path(model, stage)
        overrides: dict[str, Any] = {"run.stages": [stage]}
        if tokens:
            overrides[f"{stage}.max_tokens_per_microbatch"] = tokens
        cfg = load_config(path, overrides)
        budget = cfg.sft.max_tokens_per_microbatch if stage == "sft" else cfg.grpo.max_tokens_per_microbatch
        out["stages"][stage] = {"config": str(path) if path else "defaults", "token_budget": budget,
                                "gradient_checkpointing": cfg.model.gradient_checkpointing,
                                "gib": memory_plan(arch, cfg, stage, gpus, gpu_mem)}
    return out


def format_budget(budget: dict[str, Any]) -> str:
    stages = budget["stages"]
    lines = [f"memory per GPU, GiB: Qwen2.5-VL-{budget['model']} ({budget['parameters'] / 1e9:.2f}B "
             f"parameters), FSDP2 over {budget['gpus']} GPU(s) of {budget['gpu_mem_gib']:.0f} GiB "
             "(model: rlcs_fast/plan.py)"]
    for stage, s in stages.items():
        lines.append(f"  {stage}: {s['config']}, {s['token_budget']:,} tokens per micro-batch, activation "
                     f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    names = list(dict.fromkeys(k for s in stages.values() for k in s["gib"]))
    lines.append(f"  {'component':46s}" + "".join(f"{stage:>12s}" for stage in stages))
    for name in names:
        cells = []
        for s in stages.values():
            v = s["gib"].get(name)
            cells.append(f"{'-':>12s}" if v is None else f"{v:12,.0f}" if "tokens" in name else f"{v:12.2f}")
        lines.append(f"  {name:46s}" + "".join(cells))
    for stage, s in stages.items():
        gib = s["gib"]
        peak = max(gib["training peak (state + chosen activations)"],
                   gib.get("awake: sharded training state + vLLM pool", 0.0))
        verdict = "fits" if peak < budget["gpu_mem_gib"] * 0.95 else "DOES NOT FIT"
        lines.append(f"  => {stage}: peak {peak:.1f} of {budget['gpu_mem_gib']:.0f} GiB: {verdict}")
    return "\n".join(lines)


# --- entry point -----------------------------------------------------------------------------------------

DEFAULTS = {  # tokens, seq_len, image_tokens, activation checkpointing (the recipe configs turn it on)
    "tiny": (512, 128, 16, False),
    "3b": (16384, 4096, 576, True),
    "7b": (16384, 4096, 576, True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=["tiny", *RELEASED])
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: all)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens in the packed micro-batch (default: 16384; tiny 512)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per packed sequence (default 4096; tiny 128)")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="merged image tokens per sequence (default 576; tiny 16)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring (autotuning, allocator)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default: on for 3b/7b as in the recipe configs)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="kernels.impl")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak for MFU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rollout", default="auto", choices=["auto", "on", "off"],
                   help="profile a vLLM rollout too (auto: when vLLM is installed and a GPU is present)")
    p.add_argument("--rollout-prompts", type=int, default=64)
    p.add_argument("--rollout-n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory budget instead of measuring")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU, for --plan")
    p.add_argument("--cfg", default=None,
                   help="config to size --plan against (default: configs/<stage>_<model>.toml)")
    return p.parse_args(argv)


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    tokens, seq_len, image_tokens, ckpt = DEFAULTS[args.model]
    tokens, seq_len = args.tokens or tokens, args.seq_len or seq_len
    image_tokens = args.image_tokens if args.image_tokens is not None else image_tokens
    ckpt = ckpt if args.grad_ckpt is None else args.grad_ckpt
    if args.gpus != 1:
        raise SystemExit("rlcs_fast.profile measures one GPU (--gpus 1); for the per-GPU memory of N GPUs "
                         "under "
                         "FSDP2 use --plan --gpus N")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses an index-less torch.device("cuda")
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    full = released_config(args.model).text_config.num_hidden_layers
    layers = args.layers or full
    if layers < full and layers < 2:
        raise SystemExit("--layers must be ≥ 2 below full depth: the full-depth figures are fitted from two "
                         "depths")
    kw = dict(tokens=tokens, seq_len=seq_len, image_tokens=image_tokens, steps=args.steps, warmup=args.warmup,
              grad_ckpt=ckpt, kernels_impl=args.kernels, seed=args.seed)
    config = released_config(args.model, layers=layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, peak_source = peak_tflops(device, args.peak_tflops, dtype)
    train = profile_train(config, device, **kw)
    train["layers"] = layers
    train.update(throughput(train["time_s"]["step"], train["tokens"], train["parameters"], peak))
    report: dict[str, Any] = {
        "kind": "profile", "model": args.model, "environment": environment(device),
        "settings": {"tokens": tokens, "seq_len": seq_len, "image_tokens_per_sequence": image_tokens,
                     "layers_built": layers, "layers_full": full, "gradient_checkpointing": ckpt,
                     "kernels": args.kernels, "steps": args.steps, "warmup": args.warmup,
                     "precision": "bf16 autocast, fp32 master weights and AdamW" if device.type == "cuda"
                     else "fp32"},
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu_definition": "6 * parameters * tokens / step time / peak_tflops",
        "train": train,
    }
    if layers < full:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shallow = profile_train(released_config(args.model, layers=1), device, **kw)
        shallow["layers"] = 1
        report["train_1_layer"] = shallow
        scaled = scale_to_depth(train, shallow, layers, 1, full)
        scaled.update(throughput(scaled["time_s"]["step"], train["tokens"], scaled["parameters"], peak))
        report["scaled_to_full_depth"] = scaled
    want_rollout = args.rollout == "on" or (args.rollout == "auto" and device.type == "cuda"
                                            and vllm_available())
    if want_rollout:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["rollout"] = profile_rollout(config, device, prompts=args.rollout_prompts, n=args.rollout_n,
                                            prompt_len=args.prompt_len, response_len=args.response_len,
                                            gpu_memory_utilization=args.gpu_memory_utilization,
                                            seed=args.seed)
    else:
        report["rollout"] = {"skipped": "vLLM is not installed (pip install 'rlcs-fast[vllm]')"
                             if not vllm_available() else "no GPU, or --rollout off"}
    return report


def summary(report: dict[str, Any]) -> str:
    t = report["train"]
    s = report["settings"]
    lines = [f"{report['environment']['device']}: Qwen2.5-VL-{report['model']}, {s['layers_built']} of "
             f"{s['layers_full']} layers, {t['tokens']:,} tokens in {t['sequences']} packed sequences"]

    def row(label: str, r: dict[str, Any], mem: float | None) -> str:
        ts = r["time_s"]
        return (f"  {label:28s} step {ts['step'] * 1e3:9.1f} ms (fwd {ts['forward'] * 1e3:.1f}, bwd "
                f"{ts['backward'] * 1e3:.1f}, opt {ts['optimizer'] * 1e3:.1f})  {r['tokens_per_s']:10,.0f} "
                "tok/s  "
                f"MFU {r['mfu']:.1%}  peak {'-' if mem is None else f'{mem:.1f} GiB'}")

    lines.append(row("measured", t, t["memory"]["peak_gib"]))
    if "scaled_to_full_depth" in report:
        sc = report["scaled_to_full_depth"]
        lines.append(row(f"scaled to {sc['layers']} layers (est.)", sc | {"tokens": t["tokens"]},
                         sc["peak_memory_gib"]))
    ro = report["rollout"]
    if "skipped" in ro:
        lines.append(f"  rollout: skipped ({ro['skipped']})")
    else:
        lines.append(f"  rollout ({ro.get('decoder_layers', s['layers_built'])} layers, not scaled): "
                     f"{ro['generated_tokens']:,} tokens in {ro['time_s']['generate']:.2f} s "
                     f"({ro['generate_tokens_per_s']:,.0f} tok/s), weight sync "
                     f"{ro['time_s']['wake_and_weight_sync']:.2f} s")
    lines.append(f"  MFU against {report['peak_tflops']:.1f} TFLOP/s ({report['peak_source']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--overhead" in argv:  # the CPU count of a GRPO step's waste, before and after (issue 22)
        from .overhead import main as overhead_main

        return overhead_main(argv)
    args = parse_args(argv)
    if args.plan:
        report = memory_budget(args.model, gpus=args.gpus, gpu_mem=args.gpu_mem, tokens=args.tokens,
                               cfg_path=args.cfg)
        print(format_budget(report))
    else:
        report = run_profile(args)
        print(summary(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
