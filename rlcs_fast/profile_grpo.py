"""Time each phase of one GRPO step of Qwen2.5-VL-3B/7B (random weights) with the transformers engine.

    python -m rlcs_fast.profile_grpo --model 3b|7b|tiny [--layers K] [--prompts 8] [--n 4] [--out FILE]

The phases are the trainer's own, called as ``run_grpo`` calls them: ``grpo.generate`` (weight sync into
the engine, then ``HFEngine.generate`` of ``--n`` responses to each of ``--prompts`` image prompts,
``--response-len`` new tokens at most), ``grpo.score`` (rewards: random 0/1 per response, the scorer runs
on the CPU and is not what a GPU run measures; group advantages), then ``grpo.train`` on-policy: one
update per rollout batch, the old log-probs taken from the training forward. The no-grad forward that an
off-policy step would add (``grpo.fill_logprobs``) is timed separately as ``old_logprobs_forward``: the
time on-policy saves.
Each phase sits between device synchronisations, with the peak of ``torch.cuda.max_memory_allocated``
within it. The first step warms up (Triton autotuning, allocator) and is not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .overhead import OverheadCounter
from .profile import REPO, _build, environment, released_config, sync


@dataclass
class _Prompt:
    """A prompt as ``data.Encoder.prompt`` makes it: ids with one expanded image, mrope positions."""

    prompt_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [3, T]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images: list = field(default_factory=list)
    answer: str = ""


@dataclass
class _StepContext:
    """What the GRPO phases (``grpo.generate``, ``score``, ``fill_logprobs``, ``train``) read of the
    trainer's ``StageContext``: the same policy, engine and weight sync; a tokenizer and a scorer that
    stand in for the real ones (random weights have no vocabulary worth decoding, and the reward runs in
    CPU workers a GPU profile does not measure: random 0/1 rewards)."""

    cfg: Any
    policy: Any
    model_config: Any
    device: torch.device
    kernels_impl: str
    engine: Any
    scorer: Any
    processor: Any
    banned_token_ids: tuple[int, ...] = ()
    world: int = 1
    rank: int = 0

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync_engine(self):
        """As ``StageContext.sync_engine``: release cached memory, wake, push the policy's weights."""
        from .trainer_utils import iter_full_weights, release_cached_memory

        release_cached_memory()
        self.engine.wake_up()
        self.engine.load_weights(iter_full_weights(self.policy.model,
                                                   torch.bfloat16 if self.device.type == "cuda" else None))
        return self.engine


class _RandomScorer:
    """Random 0/1 accuracy per response, with ``RewardScorer``'s counters."""

    num_errors = num_timeouts = 0

    def __init__(self, seed: int):
        self.rng = torch.Generator().manual_seed(seed)

    def score(self, responses: list[str], answers: list[str]) -> list[dict[str, float]]:
        hits = torch.randint(0, 2, (len(responses),), generator=self.rng).tolist()
        return [{"overall": float(h), "accuracy": float(h), "format": 1.0} for h in hits]


class _IdsTokenizer:
    def batch_decode(self, ids: list[list[int]], **_) -> list[str]:
        return [" ".join(map(str, x)) for x in ids]


class _PhaseTimer:
    """``trainer_utils.Timer`` for the phases, between device synchronisations, with each phase's peak
    of ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.peaks = device, {}, {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                sync(timer.device)
                if timer.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0
                if timer.device.type == "cuda":
                    timer.peaks[name] = torch.cuda.max_memory_allocated(timer.device) / 2**30

        return _Span()


def image_prompts(config, *, prompts: int, prompt_len: int, image_tokens: int, seed: int) -> list[_Prompt]:
    """Random text around one image of ``image_tokens`` merged tokens per prompt, mrope positions included."""
    from .packing import mrope_positions, patch_dim

    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    merge = vc.spatial_merge_size
    rows = max(1, int(image_tokens**0.5))
    cols = max(1, image_tokens // rows)
    grid = torch.tensor([[1, rows * merge, cols * merge]])
    patch_values = patch_dim(vc)
    specials = [
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
        config.text_config.bos_token_id,
        config.text_config.eos_token_id,
    ]
    text_hi = min([config.text_config.vocab_size, 150000] + [t for t in specials if t is not None])
    out = []
    for _ in range(prompts):
        text = torch.randint(0, text_hi, (max(2, prompt_len),), generator=g)
        ids = torch.cat(
            [
                text[:1],
                torch.tensor([config.vision_start_token_id]),
                torch.full((rows * cols,), config.image_token_id),
                torch.tensor([config.vision_end_token_id]),
                text[1:],
            ]
        )
        pixels = torch.randn(rows * cols * merge**2, patch_values, generator=g)
        out.append(_Prompt(ids, mrope_positions(config, ids, grid), pixels, grid.clone()))
    return out


def profile_grpo(
    config,
    device: torch.device,
    *,
    cfg,
    prompts: int,
    n: int,
    prompt_len: int,
    image_tokens: int,
    response_len: int,
    kernels_impl: str,
    grad_ckpt: bool,
    steps: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Phase times (s) and peak memory (GiB) of the last of ``steps`` GRPO steps (the first warms up)."""
    from . import grpo as phases
    from .config import OptimConfig
    from .families import family_for
    from .faults import BadStepGuard
    from .rollout.build import banned_token_ids
    from .rollout.hf_engine import HFEngine
    from .trainer_utils import build_optimizer

    policy, _, backend = _build(config, device, grad_ckpt=grad_ckpt, seed=seed)
    opt, sched = build_optimizer(policy, OptimConfig(schedule="constant"), lr=1e-6, total_steps=steps)
    with torch.device(
        device
    ):  # the engine's own copy (random): the policy's weights arrive in the sync phase
        engine_model = family_for(config).model_class()(config)
    eos = config.text_config.eos_token_id
    engine = HFEngine(engine_model, device=device, batch_size=prompts * n, eos_token_id=eos, pad_token_id=eos)
    ctx = _StepContext(cfg, policy, config, device, kernels_impl, engine, _RandomScorer(seed),
                       SimpleNamespace(tokenizer=_IdsTokenizer()), banned_token_ids(config))
    grpo = cfg.grpo
    requests = image_prompts(
        config, prompts=prompts, prompt_len=prompt_len, image_tokens=image_tokens, seed=seed
    )
    guard = BadStepGuard(cfg.optim.max_bad_steps, "grpo")
    # the trainer's plan for one update per rollout batch; the off-policy plan only to time what it adds
    plan = phases.StepPlan(with_ref=False, on_policy=True, with_raw=grpo.temperature != 1.0)
    off_policy = phases.StepPlan(with_ref=False, on_policy=False, with_raw=plan.with_raw)
    for step in range(1, steps + 1):
        timer = _PhaseTimer(device)
        generated = phases.generate(ctx, requests, step, timer)  # time/sync, time/rollout
        with timer("time/reward"):
            scored = phases.score(ctx, requests, generated.completions, guard, step)
        # what the on-policy update no longer runs
        phases.fill_logprobs(ctx, scored.rollouts, None, off_policy, timer)  # time/old
        for r in scored.rollouts:
            r.old_logprobs = r.raw_logprobs = None
        stats = phases.train(ctx, scored, opt, sched, plan, guard, step, timer)  # time/train
    names = {"time/sync": "sync", "time/rollout": "rollout", "time/reward": "reward",
             "time/old": "old_logprobs_forward", "time/train": "train"}
    times = {names[k]: v for k, v in timer.times.items() if k in names}
    peaks = {names[k]: v for k, v in timer.peaks.items() if k in names}
    completions, rollouts = generated.completions, scored.rollouts
    # issue 22's figures on the device: one more, untimed, update under the counter
    with OverheadCounter(policy, opt) as counter:
        phases.update(ctx, rollouts, opt, sched, with_ref=False, on_policy=True)
    generated = sum(len(c.response_ids) for c in completions)
    trained = sum(r.sample.input_ids.numel() for r in rollouts)
    step_s = sum(t for k, t in times.items() if k != "old_logprobs_forward")
    return {
        "time_s": times,
        "peak_memory_gib": peaks or None,
        "step_s_on_policy": step_s,
        "saved_by_on_policy_s": times["old_logprobs_forward"],
        "saved_fraction": times["old_logprobs_forward"] / (step_s + times["old_logprobs_forward"]),
        "prompts": prompts,
        "n": n,
        "prompt_len": int(requests[0].prompt_ids.numel()),
        "max_response_len": response_len,
        "generated_tokens": generated,
        "generate_tokens_per_s": generated / times["rollout"],
        "trained_tokens": trained,
        "train_tokens_per_s": trained / times["train"],
        "decoder_layers": config.text_config.num_hidden_layers,
        "attention": backend,
        "train_stats": stats,
        "overhead": counter.figures(rollouts),
    }


def grpo_config(model: str, overrides: dict[str, Any]):
    from .config import load_config

    path = REPO / "configs" / ("tiny.toml" if model == "tiny" else f"grpo_{model}.toml")
    return load_config(path, {"run.stages": ["grpo"], **overrides})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.profile_grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=["tiny", "3b", "7b"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: all)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=64, help="text tokens per prompt (plus the image)")
    p.add_argument("--image-tokens", type=int, default=64, help="merged image tokens per prompt")
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="steps run; the last is reported")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument(
        "--grad-ckpt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing (default: on for 3b/7b)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    config = released_config(args.model, layers=args.layers)
    budget = (args.prompt_len + args.image_tokens + 2 + args.response_len) * max(1, args.n)
    cfg = grpo_config(
        args.model,
        {
            "grpo.max_tokens_per_microbatch": max(budget, 1024),
            "grpo.max_prompt_length": args.prompt_len + args.image_tokens + 2,
            "grpo.max_response_length": args.response_len,
            "grpo.kl_coef": 0.0,
            # one update per rollout batch (on-policy), of exactly these prompts
            "grpo.n": args.n,
            "grpo.rollout_batch_size": args.prompts,
            "grpo.mini_batch_size": args.prompts,
            "grpo.epochs": 1,
        },
    )
    grad_ckpt = args.model != "tiny" if args.grad_ckpt is None else args.grad_ckpt
    result = profile_grpo(
        config,
        device,
        cfg=cfg,
        prompts=args.prompts,
        n=args.n,
        prompt_len=args.prompt_len,
        image_tokens=args.image_tokens,
        response_len=args.response_len,
        kernels_impl=args.kernels,
        grad_ckpt=grad_ckpt,
        steps=args.steps,
        seed=args.seed,
    )
    report = {
        "kind": "profile_grpo",
        "model": args.model,
        "environment": environment(device),
        "layers_built": config.text_config.num_hidden_layers,
        "grpo": result,
    }
    t = result["time_s"]
    print(
        f"{report['environment']['device']}: GRPO step of Qwen2.5-VL-{args.model} "
        f"({report['layers_built']} layers), "
        + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
        + f"; on-policy saves {result['saved_by_on_policy_s']:.2f} s ({result['saved_fraction']:.0%})"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
