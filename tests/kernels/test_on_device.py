"""The compiled Triton kernels on a CUDA device against float64 math (the interpreter tests' GPU twin).

bf16 operands and real autotuning: relative errors of bf16 matmuls (≤ 1e-2), fresh random inputs, token
counts that are not multiples of any block, and the autotune cache bounded across micro-batch sizes.
"""

import pytest
import torch
from rlcs_fast.kernels import _common, fused_linear_grpo_loss, fused_linear_logprob, grpo_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _inputs(n, h, v, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    return hidden, weight, targets


def _float64_logprob(hidden, weight, targets):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = torch.log_softmax(h @ w.t(), -1).gather(1, targets[:, None])[:, 0]
    return lp, h, w


@pytest.mark.parametrize("n", [1000, 3001])
def test_fused_linear_logprob_compiled_matches_float64(n):
    hidden, weight, targets = _inputs(n, 512, 32000, seed=n)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = fused_linear_logprob(h, w, targets, impl="triton", chunk_size=1024)
    g = torch.randn_like(lp)
    (lp * g).sum().backward()
    ref, h64, w64 = _float64_logprob(hidden, weight, targets)
    (ref * g.double()).sum().backward()
    assert _rel(lp, ref) < 1e-3
    assert _rel(h.grad, h64.grad) < 1e-2 and _rel(w.grad, w64.grad) < 1e-2


def test_fused_linear_grpo_loss_on_policy_compiled_matches_float64():
    n = 2500
    hidden, weight, targets = _inputs(n, 512, 32000, seed=5)
    adv = torch.randn(n, device="cuda")
    mask = torch.rand(n, device="cuda") < 0.9
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(h, w, targets, None, adv, mask, impl="triton", chunk_size=1024)
    loss.backward()
    ref, h64, w64 = _float64_logprob(hidden, weight, targets)
    m = mask.double()
    # ratio 1 on-policy: the clipped surrogate is -A·ratio, token-mean over the mask
    loss64 = -(adv.double() * torch.exp(ref - ref.detach()) * m).sum() / m.sum()
    loss64.backward()
    assert _rel(loss, loss64) < 1e-3 and float(stats["ratio_max"]) == 1.0
    assert _rel(h.grad, h64.grad) < 1e-2 and _rel(w.grad, w64.grad) < 1e-2


def test_fused_linear_gspo_loss_off_policy_compiled_matches_float64():
    # GSPO off-policy: the no-grad log-prob pass for the sequence ratios, then the fused pass
    n = 2500
    hidden, weight, targets = _inputs(n, 512, 32000, seed=6)
    g = torch.Generator(device="cuda").manual_seed(6)
    seq_ids = torch.sort(torch.randint(0, 20, (n,), device="cuda", generator=g)).values
    seq_ids = torch.unique_consecutive(seq_ids, return_inverse=True)[1]
    adv = torch.randn(int(seq_ids.max()) + 1, device="cuda", generator=g)[seq_ids]
    mask = torch.rand(n, device="cuda", generator=g) < 0.9
    ref, h64, w64 = _float64_logprob(hidden, weight, targets)
    old = (ref.detach() + 0.01 * torch.randn(n, device="cuda", generator=g, dtype=torch.float64)).float()
    kw = dict(loss="gspo", clip_low=0.01, clip_high=0.01, seq_ids=seq_ids)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, w, targets, old, adv, mask, impl="triton", chunk_size=1024, **kw)
    loss.backward()
    loss64, _ = grpo_loss(ref, old.double(), adv.double(), mask, impl="torch", **kw)
    loss64.backward()
    assert _rel(loss, loss64) < 5e-2  # a signed mean of ratios near 1: bf16 log-probs move it most
    assert _rel(h.grad, h64.grad) < 1e-2 and _rel(w.grad, w64.grad) < 1e-2


def test_autotune_keys_stay_bounded_across_token_counts():
    weight = torch.randn(4096, 256, device="cuda").bfloat16()
    before = len(_common._matmul_tuned.cache)
    g = torch.Generator().manual_seed(0)
    for n in torch.randint(100, 4000, (20,), generator=g).tolist():
        dl = torch.randn(n, 4096, device="cuda").bfloat16()
        out = torch.empty(n, 256, device="cuda", dtype=torch.bfloat16)
        _common.matmul_into(dl, weight, out, accumulate=False)
        assert _rel(out, dl.double() @ weight.double()) < 1e-2
    assert len(_common._matmul_tuned.cache) - before <= 6  # buckets 128 ... 4096


@pytest.mark.parametrize("n", [1000, 3001])
def test_raw_logprobs_compiled_match_float64(n):
    # The raw-variant stats kernel (its own autotune configs): the log-probs at T = 0.7 and at T = 1 from
    # one pass, for the old-policy head and inside the on-policy fused loss.
    hidden, weight, targets = _inputs(n, 512, 32000, seed=n + 1)
    logits = hidden.double() @ weight.double().t()
    want = {t: torch.log_softmax(logits / t, -1).gather(1, targets[:, None])[:, 0] for t in (0.7, 1.0)}
    raw = torch.empty(n, device="cuda")
    lp = fused_linear_logprob(hidden, weight, targets, temperature=0.7, impl="triton", raw_logprobs_out=raw)
    assert _rel(lp, want[0.7]) < 1e-3 and _rel(raw, want[1.0]) < 1e-3
    raw2, lp2 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    adv, mask = torch.randn(n, device="cuda"), torch.ones(n, dtype=torch.bool, device="cuda")
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, weight, targets, None, adv, mask, temperature=0.7, with_entropy=True,
                                     impl="triton", chunk_size=1024, logprobs_out=lp2, raw_logprobs_out=raw2)
    loss.backward()
    assert _rel(lp2, want[0.7]) < 1e-3 and _rel(raw2, want[1.0]) < 1e-3
