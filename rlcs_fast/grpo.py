"""Stage "grpo": the policy update of GRPO on the rollouts of the run's engine.

One step reads as the algorithm, each phase a function returning a small dataclass::

    generate  (sync the weights, sample ``grpo.n`` responses per prompt)   → Generated
    score     (rewards → group advantages → dynamic-sampling filter)      → Scored
    logprobs  (old-policy and reference log-probs on packed sequences)    → fills the rollouts
    train     (clipped policy update(s) with KL over mini-batches)        → the update's statistics

Everything per token lives on packed sequences. The advantage math is :mod:`rlcs_fast.advantages`.
"""

from __future__ import annotations

import functools
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
from .packing import PackedBatch, Sample, extend_positions, pack
from .prefetch import prefetched
from .rebalance import balance_minibatches
from .rollout.engine import Completion, SamplingParams
from .schedule import plan_step, split_groups
from .stage import StageContext
from .trainer_utils import Timer, clip_grad_norm, dummy_image_sample, peak_memory_gb
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
    group: int = 0  # its prompt's index in the step: a group's responses share the prompt's image
    # [R] rollout correction (grpo.rollout_correction / rollout_rejection): the factor of each token's
    # policy-gradient term, and False where rejected (out of the loss and its normaliser)
    is_weights: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @functools.cached_property
    def response_len(self) -> int:  # counted once on the host: the micro-batch loops read it often
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
        out.append(Rollout(sample, float(advantages[j]), completion.logprobs, group=j // n))
    return out


# --- log-probs and the loss on packed sequences ----------------------------------------------------------

def logprob_head(targets: torch.Tensor, temperature: float, impl: str, with_entropy: bool = False,
                 with_raw: bool = False):
    """with_raw: [N, 2] of the log-probs at `temperature` and at 1 (a second log-sum-exp in the same kernel
    pass over the vocabulary, no second lm-head GEMM)."""
    def head(hidden: torch.Tensor, weight: torch.Tensor):
        raw = torch.empty(targets.numel(), device=targets.device) if with_raw else None
        logprobs = fused_linear_logprob(hidden, weight, targets, temperature=temperature,
                                        with_entropy=with_entropy, impl=impl, raw_logprobs_out=raw)
        if not with_raw:
            return logprobs
        return torch.stack([logprobs, raw], -1)

    return head


@torch.no_grad()
def compute_logprobs(policy, rollouts: list[Rollout], *, ctx: StageContext, max_tokens: int,
                     temperature: float, with_raw: bool = False) -> list[torch.Tensor]:
    """Per-response log-probs [R] of `policy` (old policy or reference), micro-batched by tokens
    ([R, 2] with the log-probs at T = 1 too when `with_raw`)."""
    micro, n_real = plan_rollouts(ctx, rollouts, max_tokens)
    parts = []  # [N_i] (or [N_i, 2]) per real micro-batch, kept on the device until the end
    was_training = policy.training
    policy.eval()
    for i, host in enumerate(prefetched(lambda mb: pack_rollouts(ctx, mb), micro)):
        batch = host.to(ctx.device, non_blocking=True)
        targets = batch.targets.index_select(0, batch.loss_index)
        with ctx.autocast():
            head = logprob_head(targets, temperature, ctx.kernels_impl, with_raw=with_raw)
            logprobs = policy(batch, head)
        if i < n_real:
            parts.append(logprobs.float())
    policy.train(was_training)
    order = [r for mb in micro[:n_real] for r in mb]
    flat = torch.cat(parts).cpu() if parts else torch.empty(0)  # one device→host copy per pass
    by_rollout = dict(zip(map(id, order), torch.split(flat, [r.response_len for r in order])))
    return [by_rollout[id(r)] for r in rollouts]


def plan_rollouts(ctx: StageContext, rollouts: list[Rollout], max_tokens: int) -> tuple[list[list], int]:
    """This rank's rollouts in micro-batches, a group's responses together where the budget allows (its
    image then runs through the tower once), padded with filler micro-batches (``[None]``) to the count
    of the busiest rank."""
    return plan_step(rollouts, [r.sample.input_ids.numel() for r in rollouts], max_tokens, None,
                     groups=[r.group for r in rollouts])


def pack_rollouts(ctx: StageContext, micro: list) -> PackedBatch:
    """One micro-batch packed on the host, pinned for an asynchronous copy; a filler (``[None]``) is the
    3-token sequence with the smallest image."""
    samples = [r.sample for r in micro] if micro[0] is not None else [dummy_image_sample(ctx.model_config)]
    return pack(samples, ctx.model_config.vision_config).pin_memory()


def split_raw(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (logprobs[:, 0], logprobs[:, 1]) if logprobs.dim() == 2 else (logprobs, None)


def grpo_head(grpo, targets, old, adv, mask, ref, seq_ids, norm_len, num_seqs: int, impl: str, lp_out=None,
              raw_out=None):
    """Head function: packed hidden states of response tokens → clipped GRPO loss (+ KL) and stats.
    ``old=None``: on-policy, the old log-probs are the detached current ones (written into ``lp_out``);
    ``raw_out``: the same at T = 1, for rollout/logprob_diff (from the same pass over the vocabulary)."""

    def head(hidden: torch.Tensor, weight: torch.Tensor):
        return fused_linear_grpo_loss(
            hidden, weight, targets, old, adv, mask, ref_logprobs=ref, temperature=grpo.temperature,
            clip_low=grpo.clip_low, clip_high=grpo.clip_high, clip_dual=grpo.clip_dual or None,
            kl_coef=grpo.kl_coef,
            kl_type=grpo.kl_type, agg=grpo.agg, norm_len=norm_len, seq_ids=seq_ids, num_seqs=num_seqs,
            with_entropy=True, impl=impl, logprobs_out=lp_out, raw_logprobs_out=raw_out, loss=grpo.loss)

    return head


@dataclass
class _UpdateInputs:
    """A micro-batch of the update on the host: packed (and pinned) with its per-token inputs."""

    batch: PackedBatch
    old: torch.Tensor | None = None  # [N] old-policy log-probs (None: on-policy, or a filler)
    adv: torch.Tensor | None = None  # [N] each token its response's advantage
    ref: torch.Tensor | None = None  # [N] reference log-probs (with a KL term)
    mask: torch.Tensor | None = None  # [N] False where rollout rejection drops a token (None: none dropped)
    n_loss: int = 0  # tokens in the loss (all, less the rejected)


def _update_inputs(ctx: StageContext, micro: list, with_ref: bool) -> _UpdateInputs:
    """Host work of one update micro-batch, done on the prefetch worker while the previous one computes."""
    batch = pack_rollouts(ctx, micro)
    if micro[0] is None:
        return _UpdateInputs(batch)
    n_tok = sum(r.response_len for r in micro)

    def pinned(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if torch.cuda.is_available() else t

    old = None if micro[0].old_logprobs is None else pinned(torch.cat([r.old_logprobs for r in micro]))
    adv = torch.cat([torch.full((r.response_len,), r.advantage) for r in micro])
    adv, mask, n_loss = corrected_tokens(micro, adv, n_tok)
    ref = pinned(torch.cat([r.ref_logprobs for r in micro])) if with_ref else None
    return _UpdateInputs(batch, old, pinned(adv), ref, None if mask is None else pinned(mask), n_loss)


def zero_loss_head(hidden: torch.Tensor, weight: torch.Tensor):
    """Head of a filler micro-batch (no loss tokens: ``hidden`` is [0, H]): a zero loss that still
    depends on every parameter the forward used, so its backward joins the same gradient collectives as
    the other ranks' real micro-batches; zero statistics."""
    zero = hidden.sum() * 0.0 + weight.sum() * 0.0
    return zero, {name: zero.detach() for name in ("clip_frac", "kl", "entropy", "ratio_mean", "ratio_min",
                                                    "ratio_max")}


def _fill_on_policy_logprobs(order: list[Rollout], lp_parts: list, raw_parts: list) -> None:
    """The update's own (detached) log-probs into the rollouts, with one device→host copy each."""
    lengths = [r.response_len for r in order]
    for r, logprobs in zip(order, torch.split(torch.cat(lp_parts).cpu(), lengths) if lp_parts else []):
        r.old_logprobs = logprobs
    for r, logprobs in zip(order, torch.split(torch.cat(raw_parts).cpu(), lengths) if raw_parts else []):
        r.raw_logprobs = logprobs
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


def corrected_tokens(real: list[Rollout], adv: torch.Tensor,
                     n_tok: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(advantages times the rollout-correction weights, loss mask without the rejected tokens or None
    when nothing is dropped, tokens in the loss) of a micro-batch's packed response tokens [N], on the
    host. The weights are ≥ 0, and every policy loss
    here is positively homogeneous in the advantage (max(-cA·r, -cA·clip(r)) = c·max(...)): scaling the
    advantage scales the policy-gradient term alone, not the KL, as verl's rollout_is_weights do."""
    if not real or real[0].keep is None:
        return adv, None, n_tok
    keep = torch.cat([r.keep for r in real])
    weights = torch.cat([r.is_weights for r in real])
    return adv * weights, keep, int(keep.sum())


def update(ctx: StageContext, rollouts: list[Rollout], opt, sched, *, with_ref: bool,
           on_policy: bool = False, with_raw: bool = False) -> dict[str, float]:
    """One optimizer step on a mini-batch of rollouts: clipped GRPO loss (+ KL) normalised over the whole
    mini-batch on all ranks, whatever the micro-batch split. ``on_policy``: the rollouts were sampled from
    these very weights, so the old log-probs are the training forward's own (detached, ratio 1; filled
    into ``old_logprobs`` afterwards) and no separate old-policy forward runs. ``finite`` in the result:
    False when the loss or gradient norm was NaN/inf on some rank, and the step was not applied."""
    grpo = ctx.cfg.grpo
    totals = dist.reduce_sums({"tokens": sum(r.loss_tokens for r in rollouts), "seqs": len(rollouts)})
    micro, n_real = plan_rollouts(ctx, rollouts, grpo.max_tokens_per_microbatch)
    # loss, then the token sums of clip_frac, kl, entropy, ratio_mean: on the device, read once at the end
    acc = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    lp_parts, raw_parts = [], []
    for i, host in enumerate(prefetched(lambda mb: _update_inputs(ctx, mb, with_ref), micro)):
        batch = host.batch.to(ctx.device, non_blocking=True)
        index = batch.loss_index  # [N] the response tokens of the packed batch
        targets = batch.targets.index_select(0, index)
        n_tok = batch.num_loss_tokens
        if i >= n_real:  # a filler: zero loss, same collectives as the other ranks (it has no tokens)
            with ctx.autocast():
                ctx.policy(batch, zero_loss_head, index)[0].backward()
            continue
        lp_out = torch.empty(n_tok, device=ctx.device) if on_policy else None
        raw_out = torch.empty(n_tok, device=ctx.device) if on_policy and with_raw else None
        old, adv, ref = (None if t is None else t.to(ctx.device, non_blocking=True)
                         for t in (None if on_policy else host.old, host.adv, host.ref))
        mask = (torch.ones(n_tok, dtype=torch.bool, device=ctx.device) if host.mask is None
                else host.mask.to(ctx.device, non_blocking=True))
        n_loss = host.n_loss  # the tokens the loss counts: rollout rejection drops some
        # the aggregation's denominators are those of the whole mini-batch on all ranks; FSDP2 averages
        # gradients over ranks, so `world` undoes that
        scale = float(ctx.world)
        norm_len = None
        if grpo.agg == "token_mean":
            scale *= n_loss / max(totals["tokens"], 1.0)
        elif grpo.agg == "seq_mean_token_sum_norm":
            norm_len = grpo.max_response_length * totals["seqs"]
        head = grpo_head(grpo, targets, old, adv, mask, ref, batch.seq_ids.index_select(0, index), norm_len,
                         int(totals["seqs"]), ctx.kernels_impl, lp_out, raw_out)
        with ctx.autocast():
            loss, stats = ctx.policy(batch, head, index)
        (loss * scale).backward()
        if on_policy:
            lp_parts.append(lp_out)
            if raw_out is not None:
                raw_parts.append(raw_out)
        # token-weighted statistics: divided by all tokens below
        acc += torch.stack([loss.detach().double() * (scale / ctx.world)]
                           + [stats[name].detach().double() * n_loss
                              for name in ("clip_frac", "kl", "entropy", "ratio_mean")])
    if on_policy:
        _fill_on_policy_logprobs([r for mb in micro[:n_real] for r in mb], lp_parts, raw_parts)
    values = acc.cpu().tolist()  # the update's one device→host read
    sums = dict(zip(("loss", "clip_frac", "kl", "entropy", "ratio_mean"), values))
    grad_norm = clip_grad_norm(ctx.policy, ctx.cfg.optim.grad_clip)
    lr = sched.get_last_lr()[0]
    finite = all_finite(sums["loss"], grad_norm)  # agreed by all ranks; a non-finite update changes nothing
    if finite:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    sums = dist.reduce_sums(sums)
    return {"train/loss": sums.pop("loss"),
            **{f"actor/{name}": v / max(totals["tokens"], 1.0) for name, v in sums.items()},
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
    health: dict[str, float] = field(default_factory=dict)  # reward/errors, /timeouts, /non_finite
    # this rank's share of each mini-batch after balancing tokens over ranks (None: cut `rollouts` here)
    minibatches: list[list[Rollout]] | None = None


def balance(ctx: StageContext, scored: Scored, timer: Timer) -> dict[str, float]:
    """Move whole groups between ranks so that each mini-batch's tokens are even over ranks (after the
    advantages: they travel with the rollouts); ``scored.rollouts`` becomes this rank's new share."""
    grpo = ctx.cfg.grpo
    with timer("time/balance"):
        scored.minibatches, metrics = balance_minibatches(
            scored.rollouts, grpo.rollout_batch_size // grpo.mini_batch_size, ctx.rank, ctx.world)
    scored.rollouts = [r for part in scored.minibatches for r in part]
    return metrics


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
    errors, timeouts = ctx.scorer.num_errors, ctx.scorer.num_timeouts
    scores = ctx.scorer.score(responses, answers) if responses else []
    health = reward_health(scores, ctx.scorer.num_errors - errors, ctx.scorer.num_timeouts - timeouts, step)
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
    return Scored(scores, lengths, rollouts, finite, health)


def reward_health(scores: list[dict[str, float]], errors: int, timeouts: int, step: int) -> dict[str, float]:
    """The step's reward failures over all ranks, as metrics, with a warning when there are any: a broken
    reward plug-in scores 0 (errors, timeouts) or poisons the step (non-finite) and must be seen."""
    non_finite = sum(not math.isfinite(s["overall"]) for s in scores)
    out = dist.reduce_sums({"reward/errors": errors, "reward/timeouts": timeouts,
                            "reward/non_finite": non_finite})
    if any(out.values()) and dist.rank() == 0:
        log.warning("grpo step %d: the reward function failed on %d response(s), timed out on %d (scored 0) "
                    "and returned a non-finite value for %d (the step is skipped); see reward.function",
                    step, *(int(v) for v in out.values()))
    return out


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
        minibatches = scored.minibatches or [[rollouts[k] for k in span]
                                             for span in split_groups([r.group for r in rollouts], n_mini)]
        for _ in range(grpo.epochs):
            for part in minibatches:
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
        balance_stats = balance(ctx, scored, timer)
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
               "train/skipped_steps": guard.skipped, **scored.health, **skips.metrics(), **timer.times,
               **generated.engine_memory, **balance_stats, "perf/tokens_per_s": tokens / dt, "time/step": dt,
               "mem/peak_gb": peak_memory_gb(ctx.device)}
        if step % grpo.log_every == 0 or last:
            ctx.metrics.log("grpo", step, row)
        ctx.metrics.update_bar({"reward": row["reward/overall"], "acc": row["reward/accuracy"]})
        # save (and export, at the end) before validating: a failure in validation never costs training
        checkpointer.save(step, last_step=last)
        if last:
            ctx.metrics.close_bar()
            checkpointer.export()
        if validator.should_validate(step, last):
            validator.run(step)
    ctx.metrics.close_bar()
    if start >= grpo.steps:  # resumed from the last step's checkpoint: only the export was missing
        checkpointer.export()
    ctx.close()
