"""loss="gspo" of grpo_loss (Triton under the interpreter, and the torch reference) and of the fused head, vs
verl's compute_policy_loss_gspo written out here in float64 on padded [B, T] tensors."""

import pytest
import torch
from rlcs_fast.kernels import fused_linear_grpo_loss, fused_linear_logprob, grpo_loss


# ---- verl (verl/trainer/ppo/core_algos.py, compute_policy_loss_gspo), written independently -------------
def _masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def _verl_gspo(old_log_prob, log_prob, advantages, mask, clip_low, clip_high):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    # seq-mean-token-mean
    loss = (torch.sum(pg_losses * mask, dim=-1) / torch.sum(mask, dim=-1)).mean()
    clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    ppo_kl = _masked_mean(-negative_approx_kl, mask)
    return loss, clipfrac, ppo_kl, seq_importance_ratio


def _batch(b, t, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    lp[1] = old[1] + 12.0  # a sequence log-ratio beyond verl's clamp at 10: no gradient there
    lp[2, 0] = old[2, 0] - 30.0  # one token far off: GSPO has no per-token ±20 clamp
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    adv[1] = -abs(adv[1, 0])  # negative: the unclipped branch is the one clamped at exp(10)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[3, 0] = False  # a hole
    mask[3, -1] = True
    ref = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4
    return lp, old, adv, mask, ref


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("clips", [None, (0.2, 0.28), (3e-4, 4e-4)])
@pytest.mark.parametrize("spread", [0.01, 0.3])
def test_matches_verl_gspo(impl, clips, spread):
    lp, old, adv, mask, _ = _batch(6, 11, seed=int(spread * 100), spread=spread)
    kw = {} if clips is None else dict(clip_low=clips[0], clip_high=clips[1], agg="seq_mean_token_mean")
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, old.float(), adv.float(), mask, loss="gspo", impl=impl, **kw)
    (3.0 * loss).backward()
    x64 = lp.clone().requires_grad_()
    cl, ch = clips or (3e-4, 4e-4)  # GSPO's defaults, and verl's seq-mean-token-mean
    ref_loss, clipfrac, ppo_kl, ratio = _verl_gspo(old, x64, adv, mask.double(), cl, ch)
    (3.0 * ref_loss).backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(x.grad[~mask] == 0) and torch.all(x.grad[1] == 0)
    assert stats["clip_frac"].item() == pytest.approx(clipfrac.item(), abs=1e-6)
    assert stats["ppo_kl"].item() == pytest.approx(ppo_kl.item(), rel=1e-5, abs=1e-6)
    r = ratio.detach()[mask]
    assert stats["ratio_min"].item() == pytest.approx(r.min().item(), rel=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(r.max().item(), rel=1e-5)
    assert stats["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gspo_with_kl_is_verl_plus_the_kl_loss(impl):
    lp, old, adv, mask, ref = _batch(5, 9, seed=3)
    x = lp.float().requires_grad_()
    loss, _ = grpo_loss(x, old.float(), adv.float(), mask, ref_logprobs=ref.float(), kl_coef=0.1,
                        kl_type="mse", loss="gspo", impl=impl)
    loss.backward()
    x64 = lp.clone().requires_grad_()
    pg, _, _, _ = _verl_gspo(old, x64, adv, mask.double(), 3e-4, 4e-4)
    m = mask.double()
    kl = (torch.sum(0.5 * (x64 - ref).square() * m, -1) / m.sum(-1)).mean()  # kl_loss, same aggregation
    (pg + 0.1 * kl).backward()
    torch.testing.assert_close(loss.double(), (pg + 0.1 * kl).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_packed_equals_padded(impl, agg):
    lp, old, adv, mask, ref = _batch(4, 10, seed=8)
    kw = dict(agg=agg, loss="gspo", clip_low=0.1, clip_high=0.12, kl_coef=0.05, impl=impl)
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, old.float(), adv.float(), mask, ref_logprobs=ref.float(), **kw)
    loss.backward()
    # packed: only the valid tokens, sequences back to back, plus a masked-out token of sequence 2
    keep = mask.clone()
    keep[2, -1] = True
    seq_ids = torch.arange(4)[:, None].expand(4, 10)[keep]
    xp = lp.float()[keep].detach().requires_grad_()
    loss_p, stats_p = grpo_loss(xp, old.float()[keep], adv.float()[keep], mask[keep],
                                ref_logprobs=ref.float()[keep], seq_ids=seq_ids, num_seqs=4, **kw)
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(xp.grad, x.grad[keep])
    for k in stats:
        torch.testing.assert_close(stats_p[k], stats[k])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_on_policy_is_ratio_one(impl):
    lp, _, adv, mask, _ = _batch(4, 7, seed=2)
    x = lp.float().requires_grad_()
    loss, stats = grpo_loss(x, None, adv.float(), mask, loss="gspo", impl=impl)
    loss.backward()
    m = mask.double()
    w = m / (m.shape[0] * m.sum(-1, keepdim=True))  # seq-mean-token-mean
    torch.testing.assert_close(x.grad.double(), -adv * w, rtol=1e-6, atol=1e-8)
    assert float(stats["ratio_min"]) == float(stats["ratio_max"]) == 1.0


def test_gspo_options_raise():
    lp, old, adv, mask, _ = _batch(4, 5, seed=1)
    with pytest.raises(ValueError, match="clip_dual"):
        grpo_loss(lp.float(), old.float(), adv.float(), mask, loss="gspo", clip_dual=3.0)
    with pytest.raises(ValueError, match="seq_ids"):
        grpo_loss(lp.float().flatten(), old.float().flatten(), adv.float().flatten(), mask.flatten(),
                  loss="gspo", agg="token_mean")
    with pytest.raises(ValueError, match="loss"):
        grpo_loss(lp.float(), old.float(), adv.float(), mask, loss="gpso")


# ---- the fused head ------------------------------------------------------------------------------------
def _head_inputs(n, h, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.6).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    seq_ids = torch.unique_consecutive(torch.sort(torch.randint(0, 5, (n,), generator=g)).values,
                                       return_inverse=True)[1]
    mask = torch.rand(n, generator=g) > 0.25
    with torch.no_grad():
        lp = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None])[:, 0]
    old = (lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.05).float()
    ref = (lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(int(seq_ids.max()) + 1, generator=g)[seq_ids]
    return hidden, weight, targets, old, adv, mask, ref, seq_ids


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_fused_equals_composition(impl, on_policy):
    hidden, weight, targets, old, adv, mask, ref, seq_ids = _head_inputs(43, 32, 80, seed=5)
    old = None if on_policy else old
    kw = dict(loss="gspo", clip_low=0.02, clip_high=0.03, kl_coef=0.1, seq_ids=seq_ids, impl=impl)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(h1, w1, targets, old, adv, mask, ref_logprobs=ref, temperature=0.8,
                                         chunk_size=16, with_entropy=True, **kw)
    (2.0 * loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = fused_linear_logprob(h2, w2, targets, temperature=0.8, impl=impl)
    loss2, stats2 = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, **kw)
    (2.0 * loss2).backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    for k in stats2:
        torch.testing.assert_close(stats[k], stats2[k], rtol=1e-5, atol=1e-6)
    assert not on_policy or float(stats["ratio_max"]) == 1.0


def test_fused_triton_matches_float64_ground_truth():
    hidden, weight, targets, old, adv, mask, _, seq_ids = _head_inputs(37, 48, 100, seed=9)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = dict(loss="gspo", clip_low=0.01, clip_high=0.01, seq_ids=seq_ids)
    loss, _ = fused_linear_grpo_loss(h1, w1, targets, old, adv, mask, chunk_size=16, impl="triton", **kw)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64 = torch.log_softmax(h64 @ w64.t(), -1).gather(1, targets[:, None])[:, 0]
    loss64, _ = grpo_loss(lp64, old.double(), adv.double(), mask, impl="torch", **kw)
    loss64.backward()
    assert abs(loss.item() - loss64.item()) < 1e-5
    for a, b in ((h1.grad, h64.grad), (w1.grad, w64.grad)):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5
