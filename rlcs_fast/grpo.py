"""Stage "grpo": the policy update of GRPO on the rollouts of the run's engine.

One step reads as the algorithm, each phase a function returning a small dataclass::

    generate  (sync the weights, sample ``grpo.n`` responses per prompt)   → Generated
    score     (rewards → group advantages → dynamic-sampling filter)      → Scored
    logprobs  (old-policy and reference log-probs on packed sequences)    → fills the rollouts
    train     (clipped policy update(s) with KL over mini-batches)        → the update's statistics

Everything per token lives on packed sequences. The advantage math is :mod:`rlcs_fast.advantages`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from . import dist, rollout_correction
from .advantages import dynamic_sampling_mask, group_advantages, overlong_penalty
from .checkpointer import Checkpointer
from .data import SkipCounter
from .faults import BadStepGuard, all_finite
from .kernels import fused_linear_grpo_loss, fused_linear_logprob
from .packing import Sample, extend_positions, pack
from .rollout.engine import Completion, SamplingParams
from .stage import StageContext
from .trainer_utils import Timer, clip_grad_norm, dummy_image_sample, peak_memory_gb, plan_step
from .validation import Validator, ground_truth

log = logging.getLogger("rlcs_fast")


@dataclass
class Rollout:
    """One response to one prompt, with what the update needs."""

    sample: Sample  # prompt + response, targets on the response tokens
    advantage: float
    engine_logprobs: list[float] | None
    old_logprobs: torch.Tensor | None = None  # [R] filled by the old-policy pass
    ref_logprobs: torch.Tensor | None = None  # [R] filled by the reference pass
    # [R] the old policy at T = 1 when the rollout temperature is not 1: engines report raw log-probs
    # (before temperature, top-p and bans), so rollout/logprob_diff compares the same distribution
    raw_logprobs: torch.Tensor | None = None
    # [R] rollout correction (grpo.rollout_correction / rollout_rejection): the factor of each token's
    # policy-gradient term, and False where rejected (out of the loss and its normaliser)
    is_weights: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def response_len(self) -> int:
        return int(self.sample.target_mask.sum())

    @property
    def loss_tokens(self) -> int:
        return self.response_len if self.keep is None else int(self.keep.sum())


def build_rollouts(prompts: list, completions: list[Completion], advantages: torch.Tensor,
                   n: int) -> list[Rollout]:
    """Completion ``j`` answers ``prompts[j // n]``: prompt + response as one sample, the response the
    target."""
    out = []
    for j, completion in enumerate(completions):
        prompt = prompts[j // n]
        response = torch.tensor(completion.response_ids, dtype=torch.long)
        if response.numel() == 0:
            continue  # nothing to train on (max_tokens reached 0); its group's advantages are already set
        ids = torch.cat([prompt.prompt_ids, response])
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[prompt.prompt_ids.numel():] = True
        sample = Sample(ids, target, extend_positions(prompt.position_ids, response.numel()),
                        prompt.pixel_values, prompt.image_grid_thw)
        out.append(Rollout(sample, float(advantages[j]), completion.logprobs))
    return out


# --- log-probs and the loss on packed sequences ----------------------------------------------------------

def logprob_head(targets: torch.Tensor, temperature: float, impl: str, with_entropy: bool = False,
                 with_raw: bool = False):
    """with_raw: [N, 2] of the log-probs at `temperature` and at 1 (one more lm-head pass, no forward)."""
    def head(hidden: torch.Tensor, weight: torch.Tensor):
        logprobs = fused_linear_logprob(hidden, weight, targets, temperature=temperature,
                                        with_entropy=with_entropy, impl=impl)
        if not with_raw:
            return logprobs
        raw = fused_linear_logprob(hidden, weight, targets, temperature=1.0, impl=impl)
        return torch.stack([logprobs, raw], -1)

    return head


@torch.no_grad()
def compute_logprobs(policy, rollouts: list[Rollout], *, ctx: StageContext, max_tokens: int,
                     temperature: float, with_raw: bool = False) -> list[torch.Tensor]:
    """Per-response log-probs [R] of `policy` (old policy or reference), micro-batched by tokens
    ([R, 2] with the log-probs at T = 1 too when `with_raw`)."""
    filler = dummy_image_sample(ctx.model_config)
    samples = [r.sample for r in rollouts]
    micro, n_real = plan_step(list(range(len(samples))), [s.input_ids.numel() for s in samples],
                              max_tokens, -1)
    out: list[torch.Tensor | None] = [None] * len(samples)
    was_training = policy.training
    policy.eval()
    for i, mb in enumerate(micro):
        items = [samples[k] if k >= 0 else filler for k in mb]
        batch = pack(items, ctx.model_config.vision_config).to(ctx.device)
        targets = batch.targets[batch.loss_mask]
        with ctx.autocast():
            head = logprob_head(targets, temperature, ctx.kernels_impl, with_raw=with_raw)
            logprobs = policy(batch, head).float().cpu()
        if i >= n_real:
            continue
        lengths = [int(item.target_mask.sum()) for item in items]
        for k, part in zip(mb, torch.split(logprobs, lengths)):
            if k >= 0:
                out[k] = part
    policy.train(was_training)
    return out


def split_raw(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (logprobs[:, 0], logprobs[:, 1]) if logprobs.dim() == 2 else (logprobs, None)


def grpo_head(grpo, targets, old, adv, mask, ref, seq_ids, norm_len, num_seqs: int, impl: str, lp_out=None,
              raw_out=None):
    """Head function: packed hidden states of response tokens → clipped GRPO loss (+ KL) and stats.
    ``old=None``: on-policy, the old log-probs are the detached current ones (written into ``lp_out``);
    ``raw_out``: the same at T = 1, for rollout/logprob_diff (one more lm-head pass, no gradient)."""

    def head(hidden: torch.Tensor, weight: torch.Tensor):
        if raw_out is not None:
            with torch.no_grad():
                raw_out.copy_(fused_linear_logprob(hidden.detach(), weight.detach(), targets, temperature=1.0,
                                                   impl=impl))
        return fused_linear_grpo_loss(
            hidden, weight, targets, old, adv, mask, ref_logprobs=ref, temperature=grpo.temperature,
            clip_low=grpo.clip_low, clip_high=grpo.clip_high, clip_dual=grpo.clip_dual or None,
            kl_coef=grpo.kl_coef,
            kl_type=grpo.kl_type, agg=grpo.agg, norm_len=norm_len, seq_ids=seq_ids, num_seqs=num_seqs,
            with_entropy=True, impl=impl, logprobs_out=lp_out, loss=grpo.loss)

    return head


# --- rollout correction ------------------------------------------------------------------------------------

def trainer_vs_engine(r: Rollout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the old policy's, the engine's) log-probs at T = 1 of a rollout's first tokens (as many as both
    have), or None when either is missing. Engines report raw log-probs: both sides are the same
    distribution whatever the sampling temperature."""
    if r.engine_logprobs is None or r.old_logprobs is None:
        return None
    trainer = r.raw_logprobs if r.raw_logprobs is not None else r.old_logprobs
    engine = torch.tensor(r.engine_logprobs[: r.response_len], dtype=torch.float32)
    return trainer[: engine.numel()].float(), engine


def correct_rollouts(ctx: StageContext, rollouts: list[Rollout], *, apply: bool) -> dict[str, float]:
    """``rollout_correction.weights`` on the step's rollouts: with ``apply``, each rollout's ``is_weights``
    and ``keep``; always, the ``rollout_corr/*`` metrics over all ranks' response tokens."""
    grpo = ctx.cfg.grpo
    pairs = [trainer_vs_engine(r) for r in rollouts]
    if apply and any(p is None for p in pairs):
        raise RuntimeError("grpo.rollout_correction / rollout_rejection need the engine's log-probs: the "
                           f"{ctx.cfg.rollout.engine!r} engine returned none for some responses")
    width = max([r.response_len for r in rollouts], default=0)
    old = torch.zeros(len(rollouts), width)  # [B, T] the responses padded; mask: where both log-probs are
    engine = torch.zeros(len(rollouts), width)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool)
    for i, pair in enumerate(pairs):
        if pair is not None:
            n = pair[1].numel()
            old[i, :n], engine[i, :n], mask[i, :n] = pair[0], pair[1], True
    clip_min, clip_max = grpo.rollout_correction_clip
    w, keep, m = rollout_correction.weights(
        old, engine, mask, mode=grpo.rollout_correction, clip_min=clip_min, clip_max=clip_max,
        rejection=grpo.rollout_rejection or None, rejection_threshold=grpo.rollout_rejection_threshold)
    if apply:
        for i, r in enumerate(rollouts):
            n = r.response_len  # tokens without an engine log-prob (none expected) stay in, weight as TRL's
            r.is_weights, r.keep = w[i, :n].clone(), (keep[i, :n] | ~mask[i, :n])
    # global over ranks: token means weighted by tokens, the sequence fraction by rows, extremes by max
    key, means = "rollout_corr/{}".format, ("kl_k1", "kl_k3", "ratio_mean", "masked_token_fraction")
    n_tok, rows = float(mask.sum()), float(len(rollouts))
    sums = dist.reduce_sums({"n": n_tok, "rows": rows, **{k: m[key(k)] * n_tok for k in means},
                             "masked_seq_fraction": m[key("masked_seq_fraction")] * rows})
    ext = dist.reduce_sums({"ratio_max": m[key("ratio_max")] if n_tok else -math.inf,
                            "neg_ratio_min": -m[key("ratio_min")] if n_tok else -math.inf}, "max")
    out = {key(k): sums[k] / sums["n"] if sums["n"] else 0.0 for k in means}
    out[key("masked_seq_fraction")] = sums["masked_seq_fraction"] / max(sums["rows"], 1.0)
    out[key("ratio_max")] = ext["ratio_max"] if sums["n"] else 0.0
    out[key("ratio_min")] = -ext["neg_ratio_min"] if sums["n"] else 0.0
    return out


def corrected_tokens(real: list[Rollout], adv: torch.Tensor, n_tok: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(advantages times the rollout-correction weights, loss mask without the rejected tokens, tokens in
    the loss) of a micro-batch's packed response tokens [N]. The weights are ≥ 0, and every policy loss
    here is positively homogeneous in the advantage (max(-cA·r, -cA·clip(r)) = c·max(...)): scaling the
    advantage scales the policy-gradient term alone, not the KL, as verl's rollout_is_weights do."""
    if not real or real[0].keep is None:
        return adv, torch.ones(n_tok, dtype=torch.bool, device=device), n_tok
    keep = torch.cat([r.keep for r in real])
    weights = torch.cat([r.is_weights for r in real]).to(device)
    return adv * weights, keep.to(device), int(keep.sum())


def update(ctx: StageContext, rollouts: list[Rollout], opt, sched, *, with_ref: bool,
           on_policy: bool = False, with_raw: bool = False) -> dict[str, float]:
    """One optimizer step on a mini-batch of rollouts: clipped GRPO loss (+ KL) normalised over the whole
    mini-batch on all ranks, whatever the micro-batch split. ``on_policy``: the rollouts were sampled from
    these very weights, so the old log-probs are the training forward's own (detached, ratio 1; filled
    into ``old_logprobs`` afterwards) and no separate old-policy forward runs. ``finite`` in the result:
    False when the loss or gradient norm was NaN/inf on some rank, and the step was not applied."""
    grpo = ctx.cfg.grpo
    totals = dist.reduce_sums({"tokens": sum(r.loss_tokens for r in rollouts), "seqs": len(rollouts)})
    filler = dummy_image_sample(ctx.model_config)
    micro, n_real = plan_step(list(range(len(rollouts))), [r.sample.input_ids.numel() for r in rollouts],
                              grpo.max_tokens_per_microbatch, -1)
    sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0}
    for i, mb in enumerate(micro):
        real = [rollouts[k] for k in mb if k >= 0]
        batch = pack([r.sample for r in real] or [filler], ctx.model_config.vision_config).to(ctx.device)
        index = batch.loss_mask.nonzero().squeeze(-1)  # [N] the response tokens of the packed batch
        targets = batch.targets[index]
        n_tok = targets.numel()
        lp_out = torch.empty(n_tok, device=ctx.device) if on_policy else None
        raw_out = torch.empty(n_tok, device=ctx.device) if on_policy and with_raw else None
        if real:
            old = None if on_policy else torch.cat([r.old_logprobs for r in real]).to(ctx.device)
            adv = torch.cat([torch.full((r.response_len,), r.advantage) for r in real]).to(ctx.device)
            ref = torch.cat([r.ref_logprobs for r in real]).to(ctx.device) if with_ref else None
        else:  # the zero-loss filler: same collectives as the other ranks, no gradient
            old = adv = torch.zeros(n_tok, device=ctx.device)
            ref = torch.zeros(n_tok, device=ctx.device) if with_ref else None
        adv, mask, n_tok = corrected_tokens(real, adv, n_tok, ctx.device)
        # the aggregation's denominators are those of the whole mini-batch on all ranks; FSDP2 averages
        # gradients over ranks, so `world` undoes that; a repeated (padding) micro-batch counts 0
        scale = ctx.world * (0.0 if i >= n_real else 1.0)
        norm_len = None
        if grpo.agg == "token_mean":
            scale *= n_tok / max(totals["tokens"], 1.0)
        elif grpo.agg == "seq_mean_token_sum_norm":
            norm_len = grpo.max_response_length * totals["seqs"]
        head = grpo_head(grpo, targets, old, adv, mask, ref, batch.seq_ids[index], norm_len,
                         int(totals["seqs"]), ctx.kernels_impl, lp_out, raw_out)
        with ctx.autocast():
            loss, stats = ctx.policy(batch, head, index)
        (loss * scale).backward()
        if on_policy and real:
            lengths = [r.response_len for r in real]
            for r, logprobs in zip(real, torch.split(lp_out.cpu(), lengths)):
                r.old_logprobs = logprobs
            if raw_out is not None:
                for r, logprobs in zip(real, torch.split(raw_out.cpu(), lengths)):
                    r.raw_logprobs = logprobs
        if i < n_real:
            sums["loss"] += float(loss.detach()) * scale / ctx.world
            for name in ("clip_frac", "kl", "entropy", "ratio_mean"):
                sums[name] += float(stats[name]) * n_tok  # token-weighted: divided by all tokens below
    grad_norm = clip_grad_norm(ctx.policy, ctx.cfg.optim.grad_clip)
    lr = sched.get_last_lr()[0]
    finite = all_finite(sums["loss"], grad_norm)  # agreed by all ranks; a non-finite update changes nothing
    if finite:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    sums = dist.reduce_sums(sums)
    return {"train/loss": sums.pop("loss"),
            **{f"actor/{name}": v / totals["tokens"] for name, v in sums.items()},
            "train/grad_norm": grad_norm, "train/lr": lr, "finite": finite}


# --- the phases of one step -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """What every step of this run computes, fixed at the start."""

    with_ref: bool  # a KL term: reference log-probs
    on_policy: bool  # one update per rollout batch: the old log-probs are the update's own (detached)
    with_raw: bool  # rollout temperature != 1: old log-probs at T = 1 too (engines report those)
    correct: bool = False  # rollout correction or rejection: the old log-probs before the first update


@dataclass
class Generated:
    completions: list[Completion]  # grpo.n per prompt, grouped: prompt j's at [j * n, (j + 1) * n)
    engine_memory: dict[str, float] = field(default_factory=dict)  # engines with sleep mode report it


@dataclass
class Scored:
    scores: list[dict[str, float]]  # per completion: accuracy, format, overall
    lengths: torch.Tensor  # [B * n] response lengths
    rollouts: list[Rollout]  # the completions of the groups kept by dynamic sampling
    finite: bool  # rewards and advantages finite on every rank; if not, `rollouts` is empty


def generate(ctx: StageContext, prompts: list, step: int, timer: Timer) -> Generated:
    """Push the current weights into the engine, sample ``grpo.n`` responses per prompt, put it to sleep."""
    grpo = ctx.cfg.grpo
    with timer("time/sync"):
        engine = ctx.sync_engine()
    with timer("time/rollout"):
        sampling = SamplingParams(n=grpo.n, temperature=grpo.temperature, top_p=grpo.top_p,
                                  max_tokens=grpo.max_response_length,
                                  seed=(ctx.cfg.run.seed * 1_000_003 + step) * 4099 + ctx.rank, logprobs=True,
                                  banned_token_ids=ctx.banned_token_ids)
        out = Generated(engine.generate(prompts, sampling))
        memory_gb = getattr(engine, "memory_gb", None)
        if memory_gb:
            out.engine_memory["mem/vllm_awake_gb"] = memory_gb()
        engine.sleep()
        if memory_gb:
            out.engine_memory["mem/vllm_asleep_gb"] = memory_gb()
    return out


def score(ctx: StageContext, prompts: list, completions: list[Completion], guard: BadStepGuard,
          step: int) -> Scored:
    """Rewards (+ DAPO's overlong penalty) → group advantages → the groups worth training on. A reward
    function returning NaN/inf (or an overflowing penalty) would poison every update of the step: such a
    step keeps no group (the guard counts it)."""
    grpo = ctx.cfg.grpo
    responses = ctx.processor.tokenizer.batch_decode([c.response_ids for c in completions],
                                                     skip_special_tokens=True)
    answers = [ground_truth(p.answer) for p in prompts for _ in range(grpo.n)]
    scores = ctx.scorer.score(responses, answers) if responses else []
    lengths = torch.tensor([len(c.response_ids) for c in completions], dtype=torch.float32)
    rewards = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
    if grpo.overlong_buffer:
        rewards = rewards + overlong_penalty(lengths, grpo.max_response_length, grpo.overlong_buffer,
                                             grpo.overlong_penalty)
    advantages = group_advantages(rewards, grpo.n, std_norm=grpo.std_norm)
    keep = torch.ones(len(prompts), dtype=torch.bool)
    if grpo.dynamic_sampling and len(prompts):
        keep = dynamic_sampling_mask(rewards, grpo.n)
    finite = guard.check(step, "rewards or advantages", rewards, advantages)  # agreed by all ranks
    kept = [j for j in range(len(completions)) if keep[j // grpo.n] and finite]
    rollouts = build_rollouts([prompts[j // grpo.n] for j in kept[::grpo.n]], [completions[j] for j in kept],
                              advantages[kept], grpo.n)
    return Scored(scores, lengths, rollouts, finite)


def fill_logprobs(ctx: StageContext, rollouts: list[Rollout], ref_policy, plan: StepPlan,
                  timer: Timer) -> None:
    """The old policy's log-probs (unless on-policy: the update's own forward gives them) and the
    reference's (for the KL term), in place."""
    grpo = ctx.cfg.grpo
    budget, temperature = grpo.max_tokens_per_microbatch, grpo.temperature
    with timer("time/old"):
        if not plan.on_policy or plan.correct:
            old = compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=budget, temperature=temperature,
                                   with_raw=plan.with_raw)
            for r, logprobs in zip(rollouts, old):
                r.old_logprobs, r.raw_logprobs = split_raw(logprobs)
    with timer("time/ref"):
        if plan.with_ref:
            ref = compute_logprobs(ref_policy, rollouts, ctx=ctx, max_tokens=budget, temperature=temperature)
            for r, logprobs in zip(rollouts, ref):
                r.ref_logprobs = logprobs


def train(ctx: StageContext, scored: Scored, opt, sched, plan: StepPlan, guard: BadStepGuard, step: int,
          timer: Timer) -> dict[str, float]:
    """``grpo.epochs`` passes over the rollouts in ``rollout_batch_size / mini_batch_size`` mini-batches,
    one optimizer step each; returns the last update's statistics. A non-finite update ends the step: the
    updates still to come would start from it (the same decision on every rank: collectives stay in step)."""
    grpo = ctx.cfg.grpo
    rollouts = scored.rollouts
    n_mini = grpo.rollout_batch_size // grpo.mini_batch_size  # the same on every rank: collectives line up
    stats: dict[str, float] = {}
    with timer("time/train"):
        if not scored.finite:
            return stats
        for _ in range(grpo.epochs):
            for m in range(n_mini):
                part = rollouts[m * len(rollouts) // n_mini:(m + 1) * len(rollouts) // n_mini]
                stats = update(ctx, part, opt, sched, with_ref=plan.with_ref, on_policy=plan.on_policy,
                               with_raw=plan.with_raw)
                if not stats.pop("finite"):
                    guard.bad(step, "loss or gradient norm")
                    return stats
        guard.good()
    return stats


def rollout_metrics(ctx: StageContext, generated: Generated, scored: Scored,
                    n_prompts: int) -> dict[str, float]:
    """Global means over all ranks of the step's rewards, lengths and the engine-vs-trainer log-prob gap."""
    diff_sum, diff_n = 0.0, 0
    for r in scored.rollouts:
        if r.engine_logprobs is not None and r.old_logprobs is not None:
            engine = torch.tensor(r.engine_logprobs[: r.response_len])
            trainer = r.raw_logprobs if r.raw_logprobs is not None else r.old_logprobs  # both at T = 1
            diff_sum += float((engine - trainer[: engine.numel()]).abs().sum())
            diff_n += engine.numel()
    scores, lengths = scored.scores, scored.lengths
    longest = dist.reduce_sums({"length": float(lengths.max()) if len(lengths) else 0.0}, "max")
    sums = dist.reduce_sums({
        "overall": sum(s["overall"] for s in scores), "accuracy": sum(s["accuracy"] for s in scores),
        "format": sum(s["format"] for s in scores), "count": len(scores), "length": float(lengths.sum()),
        "clipped": sum(c.finish_reason == "length" for c in generated.completions),
        "diff": diff_sum, "diff_tokens": diff_n,
        "filtered": n_prompts - len(scored.rollouts) // max(1, ctx.cfg.grpo.n)})
    count = max(sums["count"], 1.0)
    return {"reward/overall": sums["overall"] / count, "reward/accuracy": sums["accuracy"] / count,
            "reward/format": sums["format"] / count, "response/length": sums["length"] / count,
            "response/length_max": longest["length"], "response/clip_ratio": sums["clipped"] / count,
            "rollout/logprob_diff": sums["diff"] / max(sums["diff_tokens"], 1.0),
            "data/filtered_groups": sums["filtered"]}


# --- the stage ----------------------------------------------------------------------------------------------

def run_grpo(ctx: StageContext) -> None:
    grpo = ctx.cfg.grpo
    train_table, val_table = ctx.load_tables(kind="rl")
    encoder = ctx.encoder(max_length=grpo.max_prompt_length)
    updates_per_step = grpo.epochs * (grpo.rollout_batch_size // grpo.mini_batch_size)
    opt, sched = ctx.optimizer(grpo.steps * updates_per_step)
    skips = SkipCounter()
    guard = ctx.bad_step_guard()
    checkpointer = Checkpointer(ctx, opt, sched, skips, guard)
    validator = Validator(ctx, val_table, every=grpo.val_every, temperature=grpo.val_temperature,
                          n=grpo.val_n)
    start = checkpointer.resume()
    plan = StepPlan(with_ref=grpo.kl_coef > 0, on_policy=updates_per_step == 1,
                    with_raw=grpo.temperature != 1.0,
                    correct=grpo.rollout_correction != "none" or bool(grpo.rollout_rejection))
    ref_policy = ctx.reference_policy() if plan.with_ref else None
    log.info("grpo: %d steps, %d prompts x %d responses, %d update(s) per step, kl_coef %g%s, from step %d",
             grpo.steps, grpo.rollout_batch_size, grpo.n, updates_per_step, grpo.kl_coef,
             "" if plan.with_ref else " (no reference model)", start)
    if start == 0 and grpo.val_before_train:  # the starting point, for the learning curve
        ctx.metrics.log("grpo", 0, validator.generate_and_score())
    ctx.metrics.start_bar("grpo", grpo.steps, start)
    for step in range(start + 1, grpo.steps + 1):
        last = step == grpo.steps
        timer = Timer()
        t0 = time.perf_counter()
        prompts = ctx.step_batch(train_table, step, grpo.rollout_batch_size, encoder.prompt, skips)
        generated = generate(ctx, prompts, step, timer)
        with timer("time/reward"):
            scored = score(ctx, prompts, generated.completions, guard, step)
        fill_logprobs(ctx, scored.rollouts, ref_policy, plan, timer)
        corr = correct_rollouts(ctx, scored.rollouts, apply=True) if plan.correct else None
        train_stats = train(ctx, scored, opt, sched, plan, guard, step, timer)
        if corr is None:  # the mismatch metrics all the same (on-policy, from the update's own log-probs)
            corr = correct_rollouts(ctx, scored.rollouts, apply=False)
        # the next step's sync pushes the new weights to the engine
        tokens = dist.reduce_sums({"tokens": sum(r.sample.input_ids.numel() for r
                                                 in scored.rollouts)})["tokens"]
        dt = time.perf_counter() - t0
        row = {**rollout_metrics(ctx, generated, scored, len(prompts)), **corr, **train_stats,
               "train/skipped_steps": guard.skipped, **skips.metrics(), **timer.times,
               **generated.engine_memory, "perf/tokens_per_s": tokens / dt, "time/step": dt,
               "mem/peak_gb": peak_memory_gb(ctx.device)}
        if step % grpo.log_every == 0 or last:
            ctx.metrics.log("grpo", step, row)
        ctx.metrics.update_bar({"reward": row["reward/overall"], "acc": row["reward/accuracy"]})
        if validator.should_validate(step, last):
            validator.run(step)
        checkpointer.save(step, last_step=last)
    ctx.metrics.close_bar()
    checkpointer.export()
    ctx.close()
