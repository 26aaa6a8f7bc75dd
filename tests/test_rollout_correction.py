"""rollout_correction.weights against the peers' math, re-derived here in plain float64 torch the way their
code computes it: TRL's GRPOTrainer (vllm_importance_sampling_mode: ratio from (old - sampling) * mask,
clamp or masked_fill), verl's rollout_corr_helper (compute_rollout_rejection_mask: multiply-by-mask sums,
masked_mean with its 1e-8, k1 = -log_ratio; compute_offpolicy_metrics: kl, k3_kl)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcs_fast.rollout_correction import METRIC_KEYS, MODES, REJECTIONS, parse_rejection, weights


def _inputs(seed: int, B: int = 7, T: int = 9, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # an empty response
    mask[1, 1:] = False  # a one-token response
    mask[1, 0] = True
    mask[2, 3:6] = False  # holes
    rollout[3, :2] = old[3, :2] + 40.0  # ratios far outside any bound
    rollout[4, :] = old[4, :] - 25.0
    return old, rollout, mask


# --- TRL's four modes (grpo_trainer.py, _generate_and_score_completions) -------------------------------
def _trl(old, sampling, mask, mode, clip_min, clip_max):
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        zeroed = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        zeroed = (ratio < lo) | (ratio > hi)
        ratio = ratio.masked_fill(zeroed, 0.0)
    return ratio.expand_as(old), zeroed.expand_as(mask) & mask


# --- verl's rejection (rollout_corr_helper.compute_rollout_rejection_mask) ------------------------------
def _verl_masked_mean(values, mask, axis=None):
    return (values * mask).sum(dim=axis) / (mask.sum(dim=axis) + 1e-8)


def _verl_rs(log_ratio, response_mask, rollout_rs, threshold):
    mask = response_mask.to(log_ratio.dtype)
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    specs = [str(threshold)] if isinstance(threshold, float) else [s.strip() for s in threshold.split(",")]
    specs = specs * len(options) if len(specs) == 1 else specs
    lr = torch.clamp(log_ratio, min=-20.0, max=20.0)
    per_token = {"k1": -lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1.0 - lr}
    combined = torch.ones_like(mask)
    for option, spec in zip(options, specs):
        k = option[-2:]
        if k == "k1":
            lower, upper = (spec.split("_", 1) if "_" in spec else (str(1.0 / float(spec)), spec))
            lower_log, upper_log = math.log(float(lower)), math.log(float(upper))
        else:
            upper = float(spec)
        if option.startswith("token"):
            stat = per_token[k]
        elif option.startswith("seq_sum"):
            stat = (per_token[k] * mask).sum(-1, keepdim=True)
        elif option.startswith("seq_mean"):
            stat = _verl_masked_mean(per_token[k], mask, axis=-1).unsqueeze(-1)
        else:
            mx = per_token[k].masked_fill(~response_mask, float("-inf")).max(dim=-1).values
            stat = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx).unsqueeze(-1)
        keep = (stat >= lower_log) & (stat <= upper_log) if k == "k1" else stat <= upper
        combined = combined * keep.expand_as(mask).to(mask.dtype)
    return (mask * combined).bool()


def _expected_metrics(old, rollout, mask, dropped):
    n = mask.sum()
    if n == 0:
        return dict.fromkeys(METRIC_KEYS, 0.0)
    log_ratio = old - rollout
    ratio = torch.exp(log_ratio)[mask]
    return {
        "rollout_corr/kl_k1": float(_verl_masked_mean(rollout - old, mask)),
        "rollout_corr/kl_k3": float(_verl_masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)),
        "rollout_corr/ratio_mean": float(ratio.mean()),
        "rollout_corr/ratio_max": float(ratio.max()),
        "rollout_corr/ratio_min": float(ratio.min()),
        "rollout_corr/masked_token_fraction": float((dropped & mask).sum() / n),
        "rollout_corr/masked_seq_fraction": float((dropped & mask).any(-1).double().mean()),
    }


def _close_metrics(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k
        assert isinstance(got[k], float)


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.9, None), (0.0, 1.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_modes_match_trl(mode, clip_min, clip_max, seed):
    old, rollout, mask = _inputs(seed, spread=0.4)
    old_c, rollout_c, mask_c = old.clone(), rollout.clone(), mask.clone()
    w, keep, metrics = weights(old, rollout, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    want, zeroed = _trl(old, rollout, mask, mode, clip_min, clip_max)
    assert w.dtype == torch.float32 and keep.dtype == torch.bool and torch.isfinite(w).all()
    fmax = torch.finfo(torch.float32).max
    torch.testing.assert_close(w.double(), want.clamp(max=fmax).float().double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(keep, mask)  # no rejection: only a mask mode's zero weights, the mask unchanged
    _close_metrics(metrics, _expected_metrics(old, rollout, mask, zeroed))
    assert torch.equal(old, old_c) and torch.equal(rollout, rollout_c) and torch.equal(mask, mask_c)


def test_none_is_one_and_float32_inputs():
    old, rollout, mask = _inputs(3)
    w, keep, metrics = weights(old.float(), rollout.float(), mask, mode="none", clip_min=None, clip_max=None)
    assert torch.equal(w, torch.ones_like(w)) and torch.equal(keep, mask)
    assert metrics["rollout_corr/masked_token_fraction"] == 0.0
    want = float(_verl_masked_mean(rollout - old, mask))
    assert metrics["rollout_corr/kl_k1"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("rejection,threshold", [
    ("token_k1", "0.5_2.0"), ("token_k1", 2.0), ("token_k2", 0.3), ("token_k3", "0.2"),
    ("seq_sum_k1", "0.1_4"), ("seq_sum_k2", 1.5), ("seq_sum_k3", 2.0),
    ("seq_mean_k1", "0.7_1.5"), ("seq_mean_k2", 0.2), ("seq_mean_k3", 0.25),
    ("seq_max_k2", 0.8), ("seq_max_k3", 1.0),
    ("token_k1,seq_mean_k3", "0.3_3.0,0.3"), ("seq_max_k2, token_k1,seq_max_k2", "2.0"),
])  # fmt: skip
@pytest.mark.parametrize("mode", ["none", "token_mask", "sequence_truncate"])
def test_rejection_matches_verl(rejection, threshold, mode):
    old, rollout, mask = _inputs(5, B=9, T=11, spread=0.6)
    w, keep, metrics = weights(old, rollout, mask, mode=mode, clip_min=None, clip_max=3.0,
                               rejection=rejection, rejection_threshold=threshold)
    want_keep = _verl_rs(old - rollout, mask, rejection, threshold)
    assert torch.equal(keep, want_keep)
    assert (keep & ~mask).sum() == 0
    # IS comes before rejection: the weights are those without it
    w_plain, _, _ = weights(old, rollout, mask, mode=mode, clip_min=None, clip_max=3.0)
    assert torch.equal(w, w_plain)
    zeroed = torch.zeros_like(mask) if mode == "none" else _trl(old, rollout, mask, mode, None, 3.0)[1]
    _close_metrics(metrics, _expected_metrics(old, rollout, mask, zeroed | (mask & ~want_keep)))


def test_rejection_actually_rejects_and_k1_sign():
    """k1 = rollout - old (verl's -log_ratio): a token the engine found likelier than the trainer by more
    than the upper ratio is rejected; the reverse by less than the lower one is kept."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    rollout = torch.tensor([[math.log(3.0), -math.log(1.5), 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, keep, metrics = weights(old, rollout, mask, mode="none", clip_min=None, clip_max=None,
                               rejection="token_k1", rejection_threshold="0.5_2.0")
    assert keep.tolist() == [[False, True, True]]
    assert metrics["rollout_corr/masked_token_fraction"] == pytest.approx(1 / 3)
    assert metrics["rollout_corr/masked_seq_fraction"] == 1.0


def test_masked_values_do_not_leak():
    old, rollout, mask = _inputs(7, spread=0.3)
    dirty_old, dirty_rollout = old.clone(), rollout.clone()
    dirty_old[~mask] = float("nan")
    dirty_rollout[~mask] = float("inf")
    for mode in MODES:
        clean = weights(old, rollout, mask, mode=mode, clip_min=0.5, clip_max=2.0,
                        rejection="seq_mean_k3,token_k2", rejection_threshold="0.1,0.1")
        dirty = weights(dirty_old, dirty_rollout, mask, mode=mode, clip_min=0.5, clip_max=2.0,
                        rejection="seq_mean_k3,token_k2", rejection_threshold="0.1,0.1")
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1]) and clean[2] == dirty[2]
        assert torch.isfinite(dirty[0]).all()


def test_all_masked_and_degenerate_shapes():
    old, rollout, _ = _inputs(9)
    none = torch.zeros_like(old, dtype=torch.bool)
    for mode in MODES:
        w, keep, metrics = weights(old, rollout, none, mode=mode, clip_min=0.5, clip_max=2.0,
                                   rejection="seq_max_k3", rejection_threshold=0.5)
        assert not keep.any() and torch.isfinite(w).all()
        assert metrics == dict.fromkeys(METRIC_KEYS, 0.0)
    for shape in [(0, 5), (4, 0)]:
        z = torch.zeros(shape, dtype=torch.float64)
        w, keep, metrics = weights(z, z, torch.ones(shape, dtype=torch.bool), mode="sequence_mask",
                                   clip_min=None, clip_max=3.0, rejection="token_k1,seq_max_k2",
                                   rejection_threshold="2,1")
        assert w.shape == keep.shape == shape and metrics == dict.fromkeys(METRIC_KEYS, 0.0)


def test_sequence_ratio_overflow_stays_finite():
    old = torch.zeros(2, 200, dtype=torch.float64)
    rollout = torch.full((2, 200), -1.0, dtype=torch.float64)  # row log-ratio 200: exp overflows float32
    mask = torch.ones(2, 200, dtype=torch.bool)
    w, _, _ = weights(old, rollout, mask, mode="sequence_truncate", clip_min=None, clip_max=None)
    assert torch.isfinite(w).all() and (w > 1e38).all()
    w, _, metrics = weights(old, rollout, mask, mode="sequence_mask", clip_min=None, clip_max=3.0)
    assert (w == 0).all() and metrics["rollout_corr/masked_token_fraction"] == 1.0


def test_errors():
    old, rollout, mask = _inputs(0)
    with pytest.raises(ValueError, match="mode"):
        weights(old, rollout, mask, mode="token", clip_min=None, clip_max=2.0)
    with pytest.raises(ValueError, match="seq_k1"):
        weights(old, rollout, mask, mode="none", clip_min=None, clip_max=2.0, rejection="seq_k1",
                rejection_threshold=2.0)
    with pytest.raises(ValueError, match="threshold"):
        weights(old, rollout, mask, mode="none", clip_min=None, clip_max=2.0, rejection="token_k1")
    with pytest.raises(ValueError, match="token_k2"):
        parse_rejection("token_k2", "0.5_2")
    with pytest.raises(ValueError, match="one per option"):
        parse_rejection("token_k1,seq_max_k2", "2,1,3")
    assert parse_rejection("token_k1,token_k1", "2") == [("token_k1", 0.5, 2.0)]
    assert set(REJECTIONS) >= {"token_k1", "seq_mean_k1", "seq_mean_k3", "seq_max_k2"}
