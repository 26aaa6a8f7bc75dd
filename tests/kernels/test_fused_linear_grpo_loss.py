"""fused_linear_grpo_loss equals grpo_loss(fused_linear_logprob(...)) and a float64 ground truth."""

import pytest
import torch
from rlcs_fast.kernels import fused_linear_grpo_loss, fused_linear_logprob, grpo_loss


def _inputs(n, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.6).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    seq_ids = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
    seq_ids = torch.unique_consecutive(seq_ids, return_inverse=True)[1]  # sequences numbered 0..S-1
    mask = torch.rand(n, generator=g) > 0.25
    with torch.no_grad():
        lp = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None])[:, 0]
    old = (lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).float()
    ref = (lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(int(seq_ids.max()) + 1, generator=g)[seq_ids]
    return hidden, weight, targets, old, adv, mask, ref, seq_ids


CASES = [
    dict(agg="token_mean"),
    dict(agg="seq_mean_token_mean", clip_dual=3.0, kl_coef=0.1, kl_type="low_var_kl", temperature=0.7),
    dict(agg="seq_mean_token_sum", kl_coef=0.05, kl_type="mse", with_entropy=True),
    dict(agg="seq_mean_token_sum_norm", norm_len=32, kl_coef=0.2, kl_type="kl", clip_high=0.28,
         temperature=1.3),
]


def _composed(hidden, weight, targets, old, adv, mask, ref, seq_ids, case, impl):
    case = dict(case)
    temperature, with_entropy = case.pop("temperature", 1.0), case.pop("with_entropy", False)
    out = fused_linear_logprob(hidden, weight, targets, temperature=temperature,
                               with_entropy=with_entropy, impl=impl)
    lp, ent = out if with_entropy else (out, None)
    loss, stats = grpo_loss(lp, old, adv, mask, ref_logprobs=ref if case.get("kl_coef") else None,
                            seq_ids=seq_ids,
                            impl=impl, **case)  # fmt: skip
    if with_entropy:
        stats["entropy"] = ent.detach()[mask].mean()
    return loss, stats


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c["agg"] for c in CASES])
def test_fused_equals_composition(impl, case):
    hidden, weight, targets, old, adv, mask, ref, seq_ids = _inputs(41, 40, 90, torch.float32,
                                                                    seed=len(case["agg"]))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    c = dict(case)
    loss, stats = fused_linear_grpo_loss(
        h1, w1, targets, old, adv, mask, ref_logprobs=ref if c.get("kl_coef") else None, seq_ids=seq_ids,
        chunk_size=16, impl=impl, **c,
    )  # fmt: skip
    (2.5 * loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss2, stats2 = _composed(h2, w2, targets, old, adv, mask, ref, seq_ids, case, impl)
    (2.5 * loss2).backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    assert stats.keys() == stats2.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], stats2[k], rtol=1e-5, atol=1e-6)
    assert torch.all(h1.grad[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_float64_ground_truth(dtype):
    hidden, weight, targets, old, adv, mask, ref, seq_ids = _inputs(37, 48, 100, dtype, seed=9)
    case = dict(agg="seq_mean_token_mean", clip_dual=3.0, kl_coef=0.1, kl_type="low_var_kl")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h1, w1, targets, old, adv, mask, ref_logprobs=ref, seq_ids=seq_ids,
                                     temperature=0.9, chunk_size=16, impl="triton", **case)  # fmt: skip
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64 = torch.log_softmax(h64 @ w64.t() / 0.9, -1).gather(1, targets[:, None])[:, 0]
    loss64, _ = grpo_loss(lp64, old.double(), adv.double(), mask, ref_logprobs=ref.double(), seq_ids=seq_ids,
                          impl="torch", **case)  # fmt: skip
    loss64.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - loss64.item()) < 1e-4
    for a, b in ((h1.grad, h64.grad), (w1.grad, w64.grad)):
        assert a.dtype == dtype
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < tol


def test_tied_embedding_gradient():
    hidden, weight, targets, old, adv, mask, ref, seq_ids = _inputs(23, 32, 64, torch.float32, seed=4)
    ids = torch.randint(0, 64, (23,), generator=torch.Generator().manual_seed(0))
    w1 = weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(torch.tanh(w1[ids]), w1, targets, old, adv, mask, seq_ids=seq_ids,
                                     chunk_size=8)
    loss.backward()
    w2 = weight.double().requires_grad_()
    lp = torch.log_softmax(torch.tanh(w2[ids]) @ w2.t(), -1).gather(1, targets[:, None])[:, 0]
    loss2, _ = grpo_loss(lp, old.double(), adv.double(), mask, seq_ids=seq_ids, impl="torch")
    loss2.backward()
    assert ((w1.grad.double() - w2.grad).abs().max() / w2.grad.abs().max()).item() < 1e-5


def test_entropy_stat_is_masked_token_mean():
    hidden, weight, targets, old, adv, mask, ref, seq_ids = _inputs(30, 16, 50, torch.float32, seed=2)
    _, stats = fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, with_entropy=True,
                                      chunk_size=8)
    _, ent = fused_linear_logprob(hidden, weight, targets, with_entropy=True)
    torch.testing.assert_close(stats["entropy"], ent[mask].mean())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_on_policy_old_none_equals_a_separate_old_forward(impl):
    # The path run_grpo took before: a no-grad forward for the old log-probs, then the loss with them.
    # old_logprobs=None takes them from the training forward itself: same loss, same gradients.
    hidden, weight, targets, _, adv, mask, ref, seq_ids = _inputs(41, 40, 90, torch.float32, seed=3)
    case = dict(agg="seq_mean_token_mean", kl_coef=0.1, clip_dual=3.0, seq_ids=seq_ids, chunk_size=16,
                impl=impl, temperature=0.8)
    with torch.no_grad():
        old = fused_linear_logprob(hidden, weight, targets, temperature=0.8, impl=impl)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, stats1 = fused_linear_grpo_loss(h1, w1, targets, old, adv, mask, ref_logprobs=ref, **case)
    loss1.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_out = torch.full((41,), float("nan"))
    loss2, stats2 = fused_linear_grpo_loss(h2, w2, targets, None, adv, mask, ref_logprobs=ref,
                                           logprobs_out=lp_out, **case)
    loss2.backward()
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp_out, old, rtol=1e-6, atol=1e-6)
    assert float(stats2["ratio_min"]) == float(stats2["ratio_max"]) == 1.0


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.3)])
def test_raw_logprobs_out_at_t1_in_the_same_pass(impl, dtype, temperature):
    # The update's own forward yields the log-probs at T = 1 too (rollout/logprob_diff on-policy): float64
    # values, and the loss, stats, gradients and logprobs_out unchanged by asking for them.
    hidden, weight, targets, _, adv, mask, ref, seq_ids = _inputs(41, 40, 90, dtype, seed=13)
    case = dict(agg="seq_mean_token_mean", kl_coef=0.1, clip_dual=3.0, seq_ids=seq_ids, chunk_size=16,
                impl=impl, temperature=temperature, with_entropy=True)
    outs = []
    for raw in (torch.full((41,), float("nan")), None):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp_out = torch.full((41,), float("nan"))
        loss, stats = fused_linear_grpo_loss(h, w, targets, None, adv, mask, ref_logprobs=ref,
                                             logprobs_out=lp_out, raw_logprobs_out=raw, **case)
        loss.backward()
        outs.append((loss, stats, h.grad, w.grad, lp_out, raw))
    (loss1, stats1, dh1, dw1, lp1, raw), (loss2, stats2, dh2, dw2, lp2, _) = outs
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    for k in stats2:
        torch.testing.assert_close(stats1[k], stats2[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dh1, dh2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dw1, dw2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=1e-6)
    raw64 = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(raw.double(), raw64, rtol=0, atol=2e-5)
    lp64 = torch.log_softmax(hidden.double() @ weight.double().t() / temperature, -1).gather(
        1, targets[:, None])[:, 0]
    torch.testing.assert_close(lp1.double(), lp64, rtol=0, atol=2e-5)


def test_raw_logprobs_out_without_logprobs_out_at_t1():
    hidden, weight, targets, old, adv, mask, _, seq_ids = _inputs(20, 16, 50, torch.float32, seed=14)
    raw = torch.full((20,), float("nan"))
    fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, seq_ids=seq_ids, raw_logprobs_out=raw)
    torch.testing.assert_close(raw, fused_linear_logprob(hidden, weight, targets), rtol=0, atol=1e-6)
