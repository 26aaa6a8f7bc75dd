"""Rollout correction and GSPO in the trainer: the per-token weights reach the packed loss as a factor of
the policy-gradient term, rejected tokens leave the loss and its normaliser, the rollout_corr/* metrics
are those of rollout_correction.weights, and with the transformers engine in fp32 (the trainer's own
numbers) nothing is masked."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_grpo_update import _ctx, _rollouts, _step_grads

from rlcs_fast import train
from rlcs_fast.config import LOSS_DEFAULTS, ConfigError, load_config
from rlcs_fast.grpo import Rollout, compute_logprobs, correct_rollouts
from rlcs_fast.packing import Sample
from rlcs_fast.rollout_correction import METRIC_KEYS, weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_config_keys_and_errors_naming_them():
    kernel = importlib.import_module("rlcs_fast.kernels.grpo_loss")  # the package exports the function
    assert LOSS_DEFAULTS == kernel.LOSS_DEFAULTS  # the config's copy (it imports no torch) stays in step
    g = load_config(TINY).grpo
    assert (g.loss, g.clip_low, g.clip_high, g.agg, g.rollout_correction) == ("grpo", 0.2, 0.2, "token_mean",
                                                                             "none")
    g = load_config(TINY, {"grpo.loss": "gspo"}).grpo
    assert (g.clip_low, g.clip_high, g.agg) == (3e-4, 4e-4, "seq_mean_token_mean")
    g = load_config(TINY, {"grpo.loss": "gspo", "grpo.clip_low": 0.1, "grpo.agg": "token_mean"}).grpo
    assert (g.clip_low, g.clip_high, g.agg) == (0.1, 4e-4, "token_mean")  # what is set stays
    bad = [({"grpo.loss": "dapo"}, "`grpo.loss`"),
           ({"grpo.rollout_correction": "sequence"}, "`grpo.rollout_correction`"),
           ({"grpo.rollout_correction_clip": [2.0, 1.0]}, "`grpo.rollout_correction_clip`"),
           ({"grpo.rollout_correction_clip": [3.0]}, "`grpo.rollout_correction_clip`"),
           ({"grpo.rollout_rejection": "seq_k9", "grpo.rollout_rejection_threshold": 2.0},
            "`grpo.rollout_rejection`"),
           ({"grpo.rollout_rejection": "token_k1"}, "`grpo.rollout_rejection_threshold`"),
           ({"grpo.rollout_rejection": "token_k2", "grpo.rollout_rejection_threshold": "0.5_2"},
            "`grpo.rollout_rejection_threshold`"),
           ({"grpo.rollout_rejection_threshold": 2.0}, "`grpo.rollout_rejection_threshold`"),
           ({"grpo.loss": "gspo", "grpo.clip_dual": 3.0}, "`grpo.clip_dual`")]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            load_config(TINY, overrides)


def _fake_rollouts(seed: int, lengths=(4, 1, 7, 3, 5)) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.arange(3 + n)
        target = torch.zeros(3 + n, dtype=torch.bool)
        target[3:] = True
        old = -torch.rand(n, generator=g) * 2
        engine = old + torch.randn(n, generator=g) * 0.4
        r = Rollout(Sample(ids, target, torch.arange(3 + n), None, None), 1.0, engine.tolist())
        r.old_logprobs = old
        out.append(r)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_correct_rollouts_is_weights_on_the_padded_batch(temperature):
    cfg = load_config(TINY, {"grpo.rollout_correction": "token_mask",
                             "grpo.rollout_correction_clip": [0.8, 1.3],
                             "grpo.rollout_rejection": "seq_mean_k3",
                             "grpo.rollout_rejection_threshold": 0.05, "grpo.temperature": temperature})
    ctx = SimpleNamespace(cfg=cfg)
    rollouts = _fake_rollouts(1)
    if temperature != 1.0:  # the engine's log-probs are raw: the trainer's at T = 1 are the ones compared
        for r in rollouts:
            r.raw_logprobs, r.old_logprobs = r.old_logprobs, r.old_logprobs / temperature
    metrics = correct_rollouts(ctx, rollouts, apply=True)
    old = torch.zeros(5, 7)
    engine = torch.zeros(5, 7)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    for i, r in enumerate(rollouts):
        n = r.response_len
        old[i, :n] = r.raw_logprobs if r.raw_logprobs is not None else r.old_logprobs
        engine[i, :n], mask[i, :n] = torch.tensor(r.engine_logprobs), True
    w, keep, want = weights(old, engine, mask, mode="token_mask", clip_min=0.8, clip_max=1.3,
                            rejection="seq_mean_k3", rejection_threshold=0.05)
    assert set(metrics) == set(METRIC_KEYS)
    for k in want:
        assert metrics[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert 0 < want["rollout_corr/masked_token_fraction"] < 1  # the case exercises both
    for i, r in enumerate(rollouts):
        n = r.response_len
        assert torch.equal(r.is_weights, w[i, :n]) and torch.equal(r.keep, keep[i, :n])
    assert [r.loss_tokens for r in rollouts] == keep.sum(-1).tolist()


def test_correct_rollouts_without_engine_logprobs():
    ctx = SimpleNamespace(cfg=load_config(TINY, {"grpo.rollout_correction": "sequence_mask"}))
    rollouts = _fake_rollouts(2)
    rollouts[1].engine_logprobs = None
    metrics = correct_rollouts(ctx, rollouts, apply=False)  # metrics only: that response is left out
    assert metrics["rollout_corr/kl_k1"] != 0.0 and all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(RuntimeError, match="engine's log-probs"):
        correct_rollouts(ctx, rollouts, apply=True)


def _with_old(ctx, rollouts, shift=0.0):
    old = compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=ctx.cfg.grpo.max_tokens_per_microbatch,
                           temperature=ctx.cfg.grpo.temperature)
    for r, lp in zip(rollouts, old):
        r.old_logprobs = lp + shift
    return rollouts


def _close(got, want, name):  # float32 sums in another order: relative to the tensor's largest entry
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-9, name


OVERRIDES = {"grpo.max_tokens_per_microbatch": 150, "grpo.max_prompt_length": 100,
             "grpo.max_response_length": 40, "kernels.impl": "torch",
             "optim.grad_clip": 1e9}  # the gradients as computed, not clipped to norm 1


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_a_rejected_response_leaves_the_loss_and_weights_scale_the_gradient(tmp_path, loss):
    ctx = _ctx(tmp_path, **OVERRIDES, **{"grpo.loss": loss, "grpo.clip_low": 0.2, "grpo.clip_high": 0.2})
    rollouts = _with_old(ctx, _rollouts(ctx), shift=0.03)  # off-policy: clipping in play
    _, plain = _step_grads(ctx, rollouts[1:], on_policy=False)
    for r in rollouts:
        r.is_weights, r.keep = torch.ones(r.response_len), torch.ones(r.response_len, dtype=torch.bool)
    rollouts[0].keep[:] = False  # rejected whole: out of the loss and of token_mean's denominator
    rollouts[0].is_weights[:] = 7.0  # ignored: rejected
    _, rejected = _step_grads(ctx, rollouts, on_policy=False)
    assert plain.keys() == rejected.keys() and plain
    # token_mean (grpo): as if dropped; seq_mean_token_mean (gspo): the sequence still counts in the
    # number of sequences, as in verl (agg_loss's global_batch_size is the mini-batch's size)
    share = 1.0 if loss == "grpo" else (len(rollouts) - 1) / len(rollouts)
    for name, grad in plain.items():
        _close(rejected[name], share * grad, name)
    for r in rollouts[1:]:
        r.is_weights[:] = 2.5
    _, scaled = _step_grads(ctx, rollouts, on_policy=False)
    for name, grad in plain.items():
        _close(scaled[name], 2.5 * share * grad, name)


@pytest.mark.slow
def test_on_policy_update_takes_the_weights(tmp_path):
    # token_mean over all N tokens: the gradient with factor c_i per response is
    # (1/N) · Σ_parts c_part · N_part · grad(part alone); lr 0 keeps the weights
    ctx = _ctx(tmp_path, **OVERRIDES)
    parts = [[r for i, r in enumerate(_rollouts(ctx)) if i % 2 == parity] for parity in (0, 1)]
    alone = [_step_grads(ctx, part, on_policy=True)[1] for part in parts]
    sizes = [sum(r.response_len for r in part) for part in parts]
    rollouts = _rollouts(ctx)
    for i, r in enumerate(rollouts):
        r.is_weights = torch.full((r.response_len,), 0.5 if i % 2 else 1.5)
        r.keep = torch.ones(r.response_len, dtype=torch.bool)
    _, weighted = _step_grads(ctx, rollouts, on_policy=True)
    assert weighted
    for name, grad in weighted.items():
        want = (1.5 * sizes[0] * alone[0][name] + 0.5 * sizes[1] * alone[1][name]) / sum(sizes)
        _close(grad, want, name)


# --- the whole loop: the transformers engine in fp32 agrees with the trainer: nothing is masked -----------
ARGS = ["--log.progress", "false", "--run.stages", '["grpo"]', "--data.synthetic_train_size", "16",
        "--data.synthetic_val_size", "2", "--grpo.rollout_batch_size", "2", "--grpo.n", "2",
        "--grpo.max_response_length", "6", "--reward.num_workers", "1", "--grpo.steps", "2",
        "--kernels.impl", "torch", "--grpo.epochs", "1", "--grpo.rollout_correction", "sequence_mask",
        "--grpo.rollout_correction_clip", "[0.999, 1.001]", "--grpo.rollout_rejection", "token_k1,seq_max_k2",
        "--grpo.rollout_rejection_threshold", "0.999_1.001,1e-6"]


@pytest.mark.slow
@pytest.mark.parametrize("mini_batch,loss", [("1", "grpo"), ("2", "gspo")])
def test_hf_engine_fp32_masks_nothing(tmp_path, mini_batch, loss):
    # mini-batch 1: two updates per step (old log-probs from the separate pass); 2: on-policy
    args = [*ARGS, "--grpo.mini_batch_size", mini_batch, "--grpo.loss", loss]
    assert train.main(["--cfg", str(TINY), "--run.dir", str(tmp_path / "run"), *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "grpo" and "rollout_corr/kl_k1" in r]
    assert len(steps) == 2
    for r in steps:
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
        assert r["rollout_corr/masked_token_fraction"] == 0.0 and r["rollout_corr/masked_seq_fraction"] == 0.0
        assert abs(r["rollout_corr/kl_k1"]) < 1e-4 and 0.999 < r["rollout_corr/ratio_min"] <= 1.0
        assert 1.0 <= r["rollout_corr/ratio_max"] < 1.001
