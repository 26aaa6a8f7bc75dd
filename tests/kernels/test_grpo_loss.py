"""grpo_loss (Triton under the interpreter, and the torch reference) vs verl's formulas written out here."""

import itertools

import pytest
import torch
from rlcs_fast.kernels import grpo_loss, grpo_loss_reference

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
KL_TYPES = ["kl", "abs", "mse", "low_var_kl"]


# ---- verl (verl/trainer/ppo/core_algos.py), [B, T] masked form, written independently of the package ----
def _masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def _agg_loss(loss_mat, mask, mode):
    if mode == "token-mean":
        return _masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-sum":
        return torch.sum(loss_mat * mask, dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return (torch.sum(loss_mat * mask, dim=-1) / torch.sum(mask, dim=-1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return torch.sum(loss_mat * mask) / (mask.shape[0] * mask.shape[-1])  # verl 0.9: batch x horizon
    raise ValueError(mode)


def _kl_penalty(logprob, ref_logprob, kind):
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def _verl(old_log_prob, log_prob, advantages, mask, clip_low, clip_high, clip_c, ref, kl_coef, kl_type, mode):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    if clip_c is not None:
        pg_losses3 = -advantages * clip_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    else:
        pg_losses = clip_pg_losses1
    loss = _agg_loss(pg_losses, mask, mode)
    kl_mean = torch.zeros(())
    if ref is not None:
        kld = _kl_penalty(log_prob, ref, kl_type)
        loss = loss + kl_coef * _agg_loss(kld, mask, mode)
        kl_mean = _masked_mean(kld, mask)
    return loss, pg_clipfrac, kl_mean, ratio


def _batch(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    lp[0, 1], lp[1, 2] = old[0, 1] + 25.0, old[1, 2] - 25.0  # beyond verl's ±20 log-ratio clamp
    ref = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    ref[2, 0] = lp[2, 0] + 15.0  # low_var_kl beyond its ±10 clamp
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return lp, old, adv, mask, ref


CASES = [(agg, kl, dual) for agg, kl, dual in itertools.product(AGGS, [None, *KL_TYPES], [None, 3.0])]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg,kl_type,clip_dual", CASES)
def test_matches_verl(impl, agg, kl_type, clip_dual):
    lp, old, adv, mask, ref = _batch(5, 13, seed=CASES.index((agg, kl_type, clip_dual)))
    use_ref = kl_type is not None
    kw = dict(clip_low=0.2, clip_high=0.28, clip_dual=clip_dual, agg=agg)
    if use_ref:
        kw.update(ref_logprobs=ref.float(), kl_coef=0.05, kl_type=kl_type)
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, old.float(), adv.float(), mask, impl=impl, **kw)
    loss.backward()

    x64 = lp.clone().requires_grad_()
    ref_loss, clipfrac, kl_mean, ratio = _verl(
        old, x64, adv, mask.double(), 0.2, 0.28, clip_dual, ref if use_ref else None, 0.05, kl_type,
        agg.replace("_", "-"),
    )
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(x.grad[~mask] == 0)
    assert stats["clip_frac"].item() == pytest.approx(clipfrac.item(), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(kl_mean.item(), rel=1e-5, abs=1e-6)
    r = ratio.detach()[mask]
    assert stats["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-5)
    assert stats["ratio_min"].item() == pytest.approx(r.min().item(), rel=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(r.max().item(), rel=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGGS)
def test_packed_equals_batched(impl, agg):
    # A [B, T] batch and the same tokens packed as [N] with seq_ids give the same loss, stats and gradients.
    lp, old, adv, mask, ref = _batch(4, 9, seed=11)
    kw = dict(clip_dual=3.0, agg=agg, kl_coef=0.1, impl=impl)
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, old.float(), adv.float(), mask, ref_logprobs=ref.float(), **kw)
    loss.backward()
    seq_ids = torch.arange(4)[:, None].expand(4, 9).flatten()
    xp = lp.float().flatten().detach().requires_grad_()
    loss_p, stats_p = grpo_loss(
        xp, old.float().flatten(), adv.float().flatten(), mask.flatten(), ref_logprobs=ref.float().flatten(),
        seq_ids=seq_ids, norm_len=4 * 9, **kw,
    )
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(xp.grad, x.grad.flatten())
    for k in stats:
        torch.testing.assert_close(stats_p[k], stats[k])


def test_triton_equals_reference_with_bf16_logprobs():
    lp, old, adv, mask, ref = _batch(3, 17, seed=5)
    x = lp.bfloat16().requires_grad_()
    y = lp.bfloat16().requires_grad_()
    kw = dict(ref_logprobs=ref.float(), kl_coef=0.1, clip_dual=3.0)
    a, sa = grpo_loss(x, old.float(), adv.float(), mask, impl="triton", **kw)
    b, sb = grpo_loss_reference(y, old.float(), adv.float(), mask, **kw)
    a.backward()
    b.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


def test_all_masked_gives_zero_loss_and_stats():
    lp, old, adv, mask, _ = _batch(3, 5, seed=3)
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, old.float(), adv.float(), torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert all(v.item() == 0.0 for v in stats.values())


def test_bad_options_raise():
    lp, old, adv, mask, _ = _batch(3, 5, seed=3)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(lp.float(), old.float(), adv.float(), mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_dual"):
        grpo_loss(lp.float(), old.float(), adv.float(), mask, clip_dual=0.5)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(lp.float(), old.float(), adv.float(), mask, agg="seq-mean")
    with pytest.raises(ValueError, match="seq_ids"):
        grpo_loss(lp.float().flatten(), old.float().flatten(), adv.float().flatten(), mask.flatten(),
                  agg="seq_mean_token_mean")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_seq_mean_token_sum_norm_default_does_not_grow_with_the_batch(impl):
    # Dr. GRPO / TRL "dr_grpo" / verl 0.9: token sum / (B * T). Repeating the batch keeps the loss (dividing
    # by T alone doubled it), and an explicit norm_len of B * T gives the same number.
    lp, old, adv, mask, _ = _batch(4, 9, seed=3)
    one, _ = grpo_loss(lp.float(), old.float(), adv.float(), mask, agg="seq_mean_token_sum_norm", impl=impl)
    two, _ = grpo_loss(*(t.float().repeat(2, 1) for t in (lp, old, adv)), mask.repeat(2, 1),
                       agg="seq_mean_token_sum_norm", impl=impl)
    given, _ = grpo_loss(lp.float(), old.float(), adv.float(), mask, agg="seq_mean_token_sum_norm",
                         norm_len=4 * 9, impl=impl)
    torch.testing.assert_close(two, one)
    torch.testing.assert_close(given, one)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_on_policy_old_none_is_the_detached_current_logprobs(impl, agg):
    # old_logprobs=None (one update per rollout batch) must equal passing the current log-probs as the
    # old ones, against verl's formulas in float64: ratio 1, no clipping, gradient -A · w.
    g = torch.Generator().manual_seed(7)
    b, t = 3, 37
    lp64 = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    mask = torch.rand(b, t, generator=g) > 0.2
    ref = lp64.float() + 0.1 * torch.randn(b, t, generator=g)
    lp = lp64.float().requires_grad_()
    loss, stats = grpo_loss(lp, None, adv, mask, ref_logprobs=ref, kl_coef=0.05, clip_dual=3.0, agg=agg,
                            impl=impl)
    loss.backward()
    lp_ref = lp64.clone().requires_grad_()
    mode = agg.replace("_", "-")
    loss_ref, _, _, _ = _verl(lp64, lp_ref, adv.double(), mask.double(), 0.2, 0.2, 3.0, ref.double(), 0.05,
                              "low_var_kl", mode)
    loss_ref.backward()
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp_ref.grad, rtol=1e-5, atol=1e-7)
    assert float(stats["ratio_min"]) == float(stats["ratio_max"]) == 1.0 and float(stats["clip_frac"]) == 0.0
