"""GRPO: the advantage math (pure functions, no model) and, below it, the policy update.

Responses arrive in consecutive groups of ``group_size`` (``grpo.n``) per prompt: rewards ``[B * G]``,
sample ``b * G + g`` is response ``g`` to prompt ``b``.

- :func:`group_advantages`: GRPO's outcome advantage as verl's ``compute_grpo_outcome_advantage``
  computes it, ``(r - mean_group) / (std_group + eps)`` with the unbiased std, or ``r - mean_group``
  (Dr. GRPO, ``std_norm=False``). Two deliberate differences, both where verl's numbers carry no
  signal: a group whose rewards are all equal gets exactly 0 (verl's float mean can differ from the
  rewards in the last bit, and dividing that by ``eps`` gives advantages of order 1e-2 out of nothing);
  a group of one gets 0 (verl uses mean 0 and std 1 there, i.e. the raw reward, which has no baseline).
- :func:`dynamic_sampling_mask`: DAPO's dynamic sampling filter, the groups worth training on.
- :func:`overlong_penalty`: DAPO's soft overlong punishment, added to the reward before advantages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from . import dist
from .data import SkipCounter, encode_many, global_indices, rank_share
from .faults import all_finite
from .kernels import fused_linear_grpo_loss, fused_linear_logprob
from .packing import Sample, extend_positions, pack
from .rollout.engine import SamplingParams
from .stage import StageContext, ground_truth, validate
from .trainer_utils import (
    Timer,
    build_optimizer,
    clip_grad_norm,
    dummy_image_sample,
    peak_memory_gb,
    plan_step,
)

log = logging.getLogger("rlcs_fast")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    assert isinstance(group_size, int) and group_size >= 1, (
        f"group_size must be an int >= 1, got {group_size!r}"
    )
    assert rewards.dim() == 1, f"rewards must be 1-D [B * G], got shape {tuple(rewards.shape)}"
    assert rewards.numel() % group_size == 0, (
        f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
    )
    return rewards.reshape(-1, group_size)  # [B, G]


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6, std_norm: bool = True) -> Tensor:
    """GRPO outcome advantages ``[B * G]`` from rewards ``[B * G]`` (consecutive groups per prompt).

    Computed in float64 and returned in the rewards' floating dtype (float32 for integer or bool
    rewards). Never NaN for finite rewards: groups without spread and groups of one give zeros.
    """
    grouped = _groups(rewards, group_size).to(torch.float64)  # [B, G]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if group_size == 1:
        return torch.zeros(rewards.shape, dtype=out_dtype, device=rewards.device)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_norm:
        centered = centered / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    has_spread = grouped.amax(dim=1, keepdim=True) != grouped.amin(dim=1, keepdim=True)  # [B, 1]
    return torch.where(has_spread, centered, 0.0).reshape(-1).to(out_dtype)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's online filter: ``[B]`` bool, True for prompts whose ``group_size`` rewards are not all equal.

    A group with equal rewards (all right, all wrong) has zero advantage and no policy gradient. Groups
    of one are always False here, unlike verl's DAPO which keeps them: with :func:`group_advantages`
    they carry no gradient either.
    """
    grouped = _groups(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def overlong_penalty(
    response_lengths: Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment for each response, a reward term ``<= 0`` (float32).

    0 while ``length <= max_len - buffer_len``, then linear down to ``-penalty_factor`` at ``max_len``:
    ``min(-(length - (max_len - buffer_len)) / buffer_len * penalty_factor, 0)`` as verl's DAPO reward
    manager writes it, clamped at ``-penalty_factor`` beyond ``max_len`` as in the DAPO paper (the
    rollout caps lengths at ``max_len``, so the clamp only guards against a misconfigured cap).
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    expected_len = max_len - buffer_len
    exceed_len = response_lengths.to(torch.float64) - expected_len
    penalty = (-exceed_len / buffer_len * penalty_factor).clamp(min=-penalty_factor, max=0.0)
    return penalty.to(torch.float32)


# --- the GRPO stage ------------------------------------------------------------------------------------
# One step reads as the algorithm: rollout → rewards → group advantages → old / reference log-probs →
# clipped update with KL → (next step) weight sync. Everything per token lives on packed sequences.


@dataclass
class Rollout:
    """One response to one prompt, with what the update needs."""

    sample: Sample  # prompt + response, targets on the response tokens
    advantage: float
    reward: dict[str, float]
    engine_logprobs: list[float] | None
    old_logprobs: torch.Tensor | None = None  # [R] filled by the old-policy pass
    ref_logprobs: torch.Tensor | None = None  # [R] filled by the reference pass
    # [R] the old policy at T = 1 when the rollout temperature is not 1: engines report raw log-probs
    # (before temperature, top-p and bans), so rollout/logprob_diff compares the same distribution
    raw_logprobs: torch.Tensor | None = None

    @property
    def response_len(self) -> int:
        return int(self.sample.target_mask.sum())


def build_rollouts(prompts: list, completions: list, scores: list[dict[str, float]], advantages: torch.Tensor,
                   n: int) -> list[Rollout]:
    out = []
    for j, (c, s) in enumerate(zip(completions, scores)):
        p = prompts[j // n]
        resp = torch.tensor(c.response_ids, dtype=torch.long)
        if resp.numel() == 0:
            continue  # nothing to train on (max_tokens reached 0); its group's advantages are already set
        ids = torch.cat([p.prompt_ids, resp])
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[p.prompt_ids.numel():] = True
        sample = Sample(ids, target, extend_positions(p.position_ids, resp.numel()), p.pixel_values, p.image_grid_thw)
        out.append(Rollout(sample, float(advantages[j]), s, c.logprobs))
    return out


def logprob_head(targets: torch.Tensor, temperature: float, impl: str, with_entropy: bool = False,
                 with_raw: bool = False):
    """with_raw: [N, 2] of the log-probs at `temperature` and at 1 (one more lm-head pass, no forward)."""
    def head(hidden: torch.Tensor, weight: torch.Tensor):
        lp = fused_linear_logprob(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy,
                                  impl=impl)
        if not with_raw:
            return lp
        raw = fused_linear_logprob(hidden, weight, targets, temperature=1.0, impl=impl)
        return torch.stack([lp, raw], -1)

    return head


@torch.no_grad()
def compute_logprobs(policy, rollouts: list[Rollout], *, ctx: StageContext, max_tokens: int,
                     temperature: float, with_raw: bool = False) -> list[torch.Tensor]:
    """Per-response log-probs [R] of `policy` (old policy or reference), micro-batched by tokens
    ([R, 2] with the log-probs at T = 1 too when `with_raw`)."""
    filler = dummy_image_sample(ctx.model_config)
    samples = [r.sample for r in rollouts]
    micro, n_real = plan_step(list(range(len(samples))), [s.input_ids.numel() for s in samples], max_tokens, -1)
    out: list[torch.Tensor | None] = [None] * len(samples)
    was_training = policy.training
    policy.eval()
    for i, mb in enumerate(micro):
        items = [samples[k] if k >= 0 else filler for k in mb]
        batch = pack(items, ctx.model_config.vision_config).to(ctx.device)
        targets = batch.targets[batch.loss_mask]
        with ctx.autocast():
            head = logprob_head(targets, temperature, ctx.kernels_impl, with_raw=with_raw)
            lp = policy(batch, head).float().cpu()
        if i >= n_real:
            continue
        for k, part in zip(mb, torch.split(lp, [items[m].target_mask.sum().item() for m in range(len(items))])):
            if k >= 0:
                out[k] = part
    policy.train(was_training)
    return out


def grpo_head(g, targets, old, adv, mask, ref, seq_ids, norm_len, num_seqs: int, impl: str, lp_out=None,
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
            hidden, weight, targets, old, adv, mask, ref_logprobs=ref, temperature=g.temperature,
            clip_low=g.clip_low, clip_high=g.clip_high, clip_dual=g.clip_dual or None, kl_coef=g.kl_coef,
            kl_type=g.kl_type, agg=g.agg, norm_len=norm_len, seq_ids=seq_ids, num_seqs=num_seqs,
            with_entropy=True, impl=impl, logprobs_out=lp_out)

    return head


def update(ctx: StageContext, rollouts: list[Rollout], opt, sched, g, *, with_ref: bool,
           on_policy: bool = False, with_raw: bool = False) -> dict[str, float]:
    """One optimizer step on a mini-batch of rollouts: clipped GRPO loss (+ KL) normalised over the whole
    mini-batch on all ranks, whatever the micro-batch split. ``on_policy``: the rollouts were sampled from
    these very weights, so the old log-probs are the training forward's own (detached, ratio 1; filled
    into ``old_logprobs`` afterwards) and no separate old-policy forward runs."""
    counts = torch.tensor([sum(r.response_len for r in rollouts), len(rollouts)], dtype=torch.float64)
    dist.all_reduce(counts)
    global_tokens, global_seqs = float(counts[0]), float(counts[1])
    filler = dummy_image_sample(ctx.model_config)
    micro, n_real = plan_step(list(range(len(rollouts))), [r.sample.input_ids.numel() for r in rollouts],
                              g.max_tokens_per_microbatch, -1)
    stats_sum: dict[str, float] = {}
    loss_sum = 0.0
    for i, mb in enumerate(micro):
        real = [rollouts[k] for k in mb if k >= 0]
        items = [r.sample for r in real] or [filler]
        batch = pack(items, ctx.model_config.vision_config).to(ctx.device)
        index = batch.loss_mask.nonzero().squeeze(-1)
        targets = batch.targets[index]
        seq_ids = batch.seq_ids[index]
        n_tok = targets.numel()
        lp_out = torch.empty(n_tok, device=ctx.device) if on_policy else None
        raw_out = torch.empty(n_tok, device=ctx.device) if on_policy and with_raw else None
        if real:
            old = None if on_policy else torch.cat([r.old_logprobs for r in real]).to(ctx.device)
            adv = torch.cat([torch.full((r.response_len,), r.advantage) for r in real]).to(ctx.device)
            ref = torch.cat([r.ref_logprobs for r in real]).to(ctx.device) if with_ref else None
        else:
            old = adv = torch.zeros(n_tok, device=ctx.device)
            ref = torch.zeros(n_tok, device=ctx.device) if with_ref else None
        mask = torch.ones(n_tok, dtype=torch.bool, device=ctx.device)
        # the aggregation's denominators are those of the whole mini-batch (see module docstring)
        scale = ctx.world * (0.0 if i >= n_real else 1.0)
        norm_len = None
        if g.agg == "token_mean":
            scale *= n_tok / max(global_tokens, 1.0)
        elif g.agg == "seq_mean_token_sum_norm":
            norm_len = g.max_response_length * global_seqs

        head = grpo_head(g, targets, old, adv, mask, ref, seq_ids, norm_len, int(global_seqs),
                         ctx.kernels_impl, lp_out, raw_out)
        with ctx.autocast():
            loss, stats = ctx.policy(batch, head, index)
        (loss * scale).backward()
        if on_policy and real:
            for r, lp in zip(real, torch.split(lp_out.cpu(), [r.response_len for r in real])):
                r.old_logprobs = lp
            if raw_out is not None:
                for r, lp in zip(real, torch.split(raw_out.cpu(), [r.response_len for r in real])):
                    r.raw_logprobs = lp
        if i < n_real:
            loss_sum += float(loss.detach()) * scale / ctx.world
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * n_tok
    grad_norm = clip_grad_norm(ctx.policy, ctx.cfg.optim.grad_clip)
    lr = sched.get_last_lr()[0]
    finite = all_finite(loss_sum, grad_norm)  # agreed by all ranks; a non-finite update changes nothing
    if finite:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    local = torch.tensor([loss_sum] + [stats_sum.get(k, 0.0) for k in ("clip_frac", "kl", "entropy", "ratio_mean")],
                         dtype=torch.float64)
    dist.all_reduce(local)
    return {"train/loss": float(local[0]), "actor/clip_frac": float(local[1]) / global_tokens,
            "actor/kl": float(local[2]) / global_tokens, "actor/entropy": float(local[3]) / global_tokens,
            "actor/ratio_mean": float(local[4]) / global_tokens, "train/grad_norm": grad_norm, "train/lr": lr,
            "finite": finite}


def run_grpo(ctx: StageContext) -> None:
    cfg, g = ctx.cfg, ctx.cfg.grpo
    train_table, val_table = ctx.load_tables(kind="rl")
    encoder = ctx.encoder(max_length=g.max_prompt_length)
    updates_per_step = g.epochs * (g.rollout_batch_size // g.mini_batch_size)
    opt, sched = build_optimizer(ctx.policy, lr=ctx.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                                 eps=cfg.optim.eps, warmup_ratio=cfg.optim.warmup_ratio, schedule=cfg.optim.schedule,
                                 min_lr_ratio=cfg.optim.min_lr_ratio, total_steps=g.steps * updates_per_step)
    skips = SkipCounter()
    guard = ctx.bad_step_guard()
    start = ctx.resume(opt, sched, skips, guard)
    with_ref = g.kl_coef > 0
    with_raw = g.temperature != 1.0  # the engines report log-probs at T = 1 (rollout/logprob_diff)
    ref_policy = ctx.reference_policy() if with_ref else None
    on_policy = updates_per_step == 1  # the old policy is the current one: its log-probs are the detached ones
    tok = ctx.processor.tokenizer
    log.info("grpo: %d steps, %d prompts x %d responses, %d update(s) per step, kl_coef %g%s, from step %d",
             g.steps, g.rollout_batch_size, g.n, updates_per_step, g.kl_coef, "" if with_ref else " (no reference model)",
             start)
    if start == 0 and g.val_before_train:  # the starting point, for the learning curve
        ctx.metrics.log("grpo", 0, validate(ctx, val_table, temperature=g.val_temperature, n=g.val_n))
    ctx.metrics.start_bar("grpo", g.steps, start)
    for step in range(start + 1, g.steps + 1):
        timer = Timer()
        t0 = time.perf_counter()
        idx = global_indices(len(train_table), (step - 1) * g.rollout_batch_size, g.rollout_batch_size, cfg.run.seed)
        mine = rank_share(idx, ctx.rank, ctx.world)
        prompts = encode_many(lambda row, i: encoder.prompt(row, i), ((train_table[i], i) for i in mine), skips,
                              "data.train")
        # 1. rollout with the current weights
        with timer("time/sync"):
            ctx.sync_engine()
        with timer("time/rollout"):
            sampling = SamplingParams(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_response_length,
                                      seed=(cfg.run.seed * 1_000_003 + step) * 4099 + ctx.rank, logprobs=True,
                                      banned_token_ids=ctx.banned_token_ids)
            completions = ctx.engine.generate(prompts, sampling)
            engine_memory = getattr(ctx.engine, "memory_gb", None)  # engines with sleep mode report it
            vllm_mem = {"mem/vllm_awake_gb": engine_memory()} if engine_memory else {}
            ctx.engine.sleep()
            if engine_memory:
                vllm_mem["mem/vllm_asleep_gb"] = engine_memory()
        # 2. rewards and group advantages
        with timer("time/reward"):
            responses = tok.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
            answers = [ground_truth(p.answer) for p in prompts for _ in range(g.n)]
            scores = ctx.scorer.score(responses, answers) if responses else []
            lengths = torch.tensor([len(c.response_ids) for c in completions], dtype=torch.float32)
            rewards = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
            if g.overlong_buffer:
                rewards = rewards + overlong_penalty(lengths, g.max_response_length, g.overlong_buffer, g.overlong_penalty)
            advantages = group_advantages(rewards, g.n, std_norm=g.std_norm)
            keep = torch.ones(len(prompts), dtype=torch.bool)
            if g.dynamic_sampling and len(prompts):
                keep = dynamic_sampling_mask(rewards, g.n)
            # a reward function returning NaN/inf (or an overflowing penalty) poisons every update of the step
            step_ok = guard.check(step, "rewards or advantages", rewards, advantages)
            kept = [j for j in range(len(completions)) if keep[j // g.n] and step_ok]
            rollouts = build_rollouts([prompts[j // g.n] for j in kept[::g.n]] if kept else [],
                                      [completions[j] for j in kept], [scores[j] for j in kept], advantages[kept], g.n)
        # 3. old and reference log-probs on packed sequences
        with timer("time/old"):
            if not on_policy:
                for r, lp in zip(rollouts, compute_logprobs(ctx.policy, rollouts, ctx=ctx,
                                                            max_tokens=g.max_tokens_per_microbatch,
                                                            temperature=g.temperature, with_raw=with_raw)):
                    r.old_logprobs, r.raw_logprobs = split_raw(lp)
        with timer("time/ref"):
            if with_ref:
                for r, lp in zip(rollouts, compute_logprobs(ref_policy, rollouts, ctx=ctx,
                                                            max_tokens=g.max_tokens_per_microbatch,
                                                            temperature=g.temperature)):
                    r.ref_logprobs = lp
        # 4. clipped policy update(s) over mini-batches
        with timer("time/train"):
            train_stats: dict[str, float] = {}
            n_mini = g.rollout_batch_size // g.mini_batch_size  # the same on every rank: collectives line up
            for _ in range(g.epochs):
                for m0 in range(n_mini):
                    if not step_ok:  # the same decision on every rank: the collectives stay in step
                        break
                    part = rollouts[m0 * len(rollouts) // n_mini:(m0 + 1) * len(rollouts) // n_mini]
                    train_stats = update(ctx, part, opt, sched, g, with_ref=with_ref, on_policy=on_policy,
                                         with_raw=with_raw)
                    if not train_stats.pop("finite"):
                        step_ok = False  # the updates still to come would start from a non-finite step
                        guard.bad(step, "loss or gradient norm")
            if step_ok:
                guard.good()
        # 5. metrics (the next step's sync pushes the new weights to the engine)
        row = rollout_metrics(ctx, scores, lengths, completions, rollouts, skips, len(prompts))
        row.update(train_stats)
        row["train/skipped_steps"] = guard.skipped
        row.update(skips.metrics())
        row.update(timer.times)
        row.update(vllm_mem)
        dt = time.perf_counter() - t0
        tokens = float(dist.all_reduce(torch.tensor([float(sum(r.sample.input_ids.numel() for r in rollouts))]))[0])
        row.update({"perf/tokens_per_s": tokens / dt, "time/step": dt, "mem/peak_gb": peak_memory_gb(ctx.device)})
        if step % g.log_every == 0 or step == g.steps:
            ctx.metrics.log("grpo", step, row)
        ctx.metrics.update_bar({"reward": row["reward/overall"], "acc": row["reward/accuracy"]})
        last = step == g.steps
        if (g.val_every and step % g.val_every == 0) or last:
            vrow = validate(ctx, val_table, temperature=g.val_temperature, n=g.val_n)
            ctx.metrics.log("grpo", step, vrow)
            log.info("grpo step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in vrow.items()))
        ctx.end_step(step, opt, sched, skips, guard,
                     save=bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last)
    ctx.metrics.close_bar()
    ctx.finish()


def split_raw(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (lp[:, 0], lp[:, 1]) if lp.dim() == 2 else (lp, None)


def rollout_metrics(ctx: StageContext, scores, lengths, completions, rollouts, skips, n_prompts) -> dict[str, float]:
    """Global means over all ranks of the step's rewards, lengths and the engine-vs-trainer log-prob gap."""
    diff_sum, diff_n = 0.0, 0
    for r in rollouts:
        if r.engine_logprobs is not None and r.old_logprobs is not None:
            e = torch.tensor(r.engine_logprobs[: r.response_len])
            trainer = r.raw_logprobs if r.raw_logprobs is not None else r.old_logprobs  # both at T = 1
            diff_sum += float((e - trainer[: e.numel()]).abs().sum())
            diff_n += e.numel()
    s = torch.tensor([sum(x["overall"] for x in scores), sum(x["accuracy"] for x in scores),
                      sum(x["format"] for x in scores), len(scores), float(lengths.sum()),
                      sum(c.finish_reason == "length" for c in completions), diff_sum, diff_n, skips.total,
                      n_prompts - len(rollouts) // max(1, ctx.cfg.grpo.n), float(lengths.max()) if len(lengths) else 0.0],
                     dtype=torch.float64)
    mx = dist.all_reduce(s[10:11].clone(), "max")
    dist.all_reduce(s)
    n = max(float(s[3]), 1.0)
    return {"reward/overall": float(s[0]) / n, "reward/accuracy": float(s[1]) / n, "reward/format": float(s[2]) / n,
            "response/length": float(s[4]) / n, "response/length_max": float(mx[0]),
            "response/clip_ratio": float(s[5]) / n, "rollout/logprob_diff": float(s[6]) / max(float(s[7]), 1.0),
            "data/skipped": float(s[8]), "data/filtered_groups": float(s[9])}
