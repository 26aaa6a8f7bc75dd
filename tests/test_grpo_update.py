"""The GRPO update moves the policy the right way: after one step, responses with positive advantage are
more likely and those with negative advantage less likely, through the trainer's own update path
(packing, micro-batching, fused head, global normalisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlcs_fast.config import OptimConfig, load_config
from rlcs_fast.grpo import Rollout, compute_logprobs, update
from rlcs_fast.metrics import MetricsLogger
from rlcs_fast.model import resolve_model_path
from rlcs_fast.packing import Sample, extend_positions
from rlcs_fast.stage import StageContext
from rlcs_fast.trainer_utils import build_optimizer

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def _rollouts(ctx, n_per_sign: int = 3) -> list[Rollout]:
    table, _ = ctx.load_tables(kind="rl")
    enc = ctx.encoder(max_length=256)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(2 * n_per_sign):
        p = enc.prompt(table[i], i)
        resp = torch.randint(0, 1000, (5 + i,), generator=g)
        ids = torch.cat([p.prompt_ids, resp])
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[p.prompt_ids.numel():] = True
        s = Sample(ids, target, extend_positions(p.position_ids, resp.numel()), p.pixel_values,
                   p.image_grid_thw)
        out.append(Rollout(s, 1.0 if i % 2 == 0 else -1.0, None))
    return out


def _ctx(tmp_path, **overrides):
    cfg = load_config(TINY, {"run.dir": str(tmp_path), "log.progress": False,
                                    "data.synthetic_train_size": 16, "data.synthetic_val_size": 4,
                             **overrides})
    return StageContext.create(cfg, "grpo", resolve_model_path("tiny"), rank=0, world=1,
                               device=torch.device("cpu"), metrics=MetricsLogger(tmp_path, progress=False))


@pytest.mark.slow
def test_update_raises_positive_and_lowers_negative_advantage(tmp_path):
    ctx = _ctx(tmp_path, **{"grpo.max_tokens_per_microbatch": 400, "kernels.impl": "torch"})
    g = ctx.cfg.grpo
    rollouts = _rollouts(ctx)
    before = compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=400, temperature=g.temperature)
    for r, lp in zip(rollouts, before):
        r.old_logprobs = lp
    opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=1e-3, total_steps=1)
    stats = update(ctx, rollouts, opt, sched, with_ref=False)
    assert stats["actor/clip_frac"] == 0.0 and abs(stats["actor/ratio_mean"] - 1.0) < 1e-6
    after = compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=400, temperature=g.temperature)
    for r, b, a in zip(rollouts, before, after):
        delta = float(a.sum() - b.sum())
        assert delta * r.advantage > 0, (r.advantage, delta)


@pytest.mark.slow
def test_update_gradient_does_not_depend_on_token_budget(tmp_path):
    grads = []
    for budget in (150, 400, 4000):
        ctx = _ctx(tmp_path / str(budget), **{"grpo.max_tokens_per_microbatch": budget,
                                              "grpo.max_prompt_length": 100, "grpo.max_response_length": 40})
        g = ctx.cfg.grpo
        rollouts = _rollouts(ctx)
        for r, lp in zip(rollouts, compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=budget,
                                                    temperature=g.temperature)):
            r.old_logprobs = lp + 0.05  # off-policy, so clipping is exercised too
        opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=0.0, total_steps=1)
        captured = {}
        orig_step = opt.step

        def capture(*a, _captured=captured, _policy=ctx.policy, _step=orig_step, **k):
            _captured.update({n: p.grad.clone() for n, p in _policy.named_parameters() if p.grad is not None})
            return _step(*a, **k)

        opt.step = capture
        update(ctx, rollouts, opt, sched, with_ref=False)
        grads.append(captured)
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _step_grads(ctx, rollouts, on_policy: bool):
    opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=0.0, total_steps=1)
    captured = {}
    orig_step = opt.step

    def capture(*a, **k):
        captured.update({n: p.grad.clone() for n, p in ctx.policy.named_parameters() if p.grad is not None})
        return orig_step(*a, **k)

    opt.step = capture
    stats = update(ctx, rollouts, opt, sched, with_ref=False, on_policy=on_policy)
    return stats, captured


@pytest.mark.slow
def test_on_policy_update_equals_a_separate_old_logprob_forward(tmp_path):
    # One update per rollout batch: the detached log-probs of the training forward replace the no-grad
    # forward run_grpo ran before; loss, statistics and every gradient are those of the old path.
    overrides = {"grpo.max_tokens_per_microbatch": 150, "grpo.max_prompt_length": 100,
                 "grpo.max_response_length": 40, "kernels.impl": "torch"}
    ctx = _ctx(tmp_path / "old", **overrides)
    old_path = _rollouts(ctx)
    for r, lp in zip(old_path, compute_logprobs(ctx.policy, old_path, ctx=ctx, max_tokens=150,
                                                temperature=ctx.cfg.grpo.temperature)):
        r.old_logprobs = lp
    stats_old, grads_old = _step_grads(ctx, old_path, on_policy=False)
    ctx = _ctx(tmp_path / "new", **overrides)
    new_path = _rollouts(ctx)
    stats_new, grads_new = _step_grads(ctx, new_path, on_policy=True)
    assert stats_new["actor/ratio_mean"] == 1.0 and stats_new["actor/clip_frac"] == 0.0
    for k in ("train/loss", "actor/entropy", "train/grad_norm"):
        new, old = stats_new[k], stats_old[k]
        assert abs(new - old) <= 1e-5 * max(1.0, abs(old)), (k, new, old)
    assert grads_new.keys() == grads_old.keys() and grads_new
    for name, grad in grads_old.items():
        torch.testing.assert_close(grads_new[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # The training forward's log-probs are kept for the engine-vs-trainer log-prob gap metric.
    for a, b in zip(new_path, old_path):
        torch.testing.assert_close(a.old_logprobs, b.old_logprobs, rtol=1e-5, atol=1e-5)
