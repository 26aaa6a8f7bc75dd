"""Hidden states → GRPO loss: ``rlcs_fast.kernels.fused_linear_grpo_loss`` (gradients formed in the forward
pass) against the composition ``grpo_loss(fused_linear_logprob(...))``, the chunked torch reference, a naive
eager version (full [N, V] logits), ``torch.compile`` of it, and Liger-Kernel's ``LigerFusedLinearGRPOLoss``
(``loss_type="dapo"``: token-mean, the same k3 KL, sequences of 1,024 tokens). Recipe options: clip 0.2 /
0.28, ``low_var_kl`` at 1e-2. Forward only (no gradient wanted) and forward+backward (the policy update).
"""

from __future__ import annotations

import pytest
import torch
from benchlib import SEQ_LEN, Record, assert_close, compiled, liger_or_skip, run_case
from rlcs_fast.kernels import (
    fused_linear_grpo_loss,
    fused_linear_grpo_loss_reference,
    fused_linear_logprob,
    fused_linear_logprob_reference,
    grpo_loss,
    grpo_loss_reference,
)

METHODS = ["rlcs_triton", "rlcs_triton_composed", "torch_chunked", "eager_naive", "compile_naive", "liger"]
OPTIONS = dict(clip_low=0.2, clip_high=0.28, kl_coef=1e-2, kl_type="low_var_kl", agg="token_mean")


def naive(h, w, t, old, adv, mask, ref):
    lp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, t[:, None])[:, 0]
    return grpo_loss_reference(lp, old, adv, mask, ref_logprobs=ref, **OPTIONS)[0]


def inputs(run, shape: dict, grad: bool):
    n, hid, v = shape["N"], shape["H"], shape["V"]
    g = run.generator(0)
    dev = run.device
    seq_len = SEQ_LEN if not run.ci else n // 4
    h = torch.randn(n, hid, device=dev, generator=g).to(run.dtype).requires_grad_(grad)
    w = (torch.randn(v, hid, device=dev, generator=g) * hid**-0.5).to(run.dtype).requires_grad_(grad)
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    with torch.no_grad():  # old / ref log-probs near the policy's, as in a real step
        lp = fused_linear_logprob_reference(h.detach(), w.detach(), t)
    old = lp + 0.05 * torch.randn(n, device=dev, generator=g)
    ref = lp + 0.05 * torch.randn(n, device=dev, generator=g)
    seq_adv = torch.randn(n // seq_len, device=dev, generator=g)
    mask = torch.rand(n, device=dev, generator=g) < 0.9
    return h, w, t, old, seq_adv, mask, ref, seq_len


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_linear_grpo_loss(benchmark, bench_run, shape, method, mode):
    run = bench_run
    rec = Record("fused_linear_grpo_loss", mode, method, shape["model"], shape["N"], shape["H"], shape["V"])
    h, w, t, old, seq_adv, mask, ref, seq_len = inputs(run, shape, grad=mode == "fwd+bwd")
    adv = seq_adv.repeat_interleave(seq_len)
    if method == "rlcs_triton":
        def f():
            return fused_linear_grpo_loss(h, w, t, old, adv, mask, ref_logprobs=ref, impl=run.impl,
                                          **OPTIONS)[0]  # fmt: skip
    elif method == "rlcs_triton_composed":
        def f():
            lp = fused_linear_logprob(h, w, t, impl=run.impl)
            return grpo_loss(lp, old, adv, mask, ref_logprobs=ref, impl=run.impl, **OPTIONS)[0]
    elif method == "torch_chunked":
        def f():
            return fused_linear_grpo_loss_reference(h, w, t, old, adv, mask, ref_logprobs=ref, **OPTIONS)[0]
    elif method == "eager_naive":
        def f():
            return naive(h, w, t, old, adv, mask, ref)
    elif method == "compile_naive":
        fc = compiled(naive, run.compile_backend)

        def f():
            return fc(h, w, t, old, adv, mask, ref)
    else:
        liger = liger_or_skip(rec, run.records, "liger_kernel.chunked_loss")
        b = shape["N"] // seq_len
        loss_fn = liger.LigerFusedLinearGRPOLoss(
            beta=OPTIONS["kl_coef"], epsilon_low=OPTIONS["clip_low"], epsilon_high=OPTIONS["clip_high"],
            loss_type="dapo", use_ref_model=True, compiled=not run.ci)
        # Its forward always forms dh/dW (torch.autograd.grad per chunk, even under no_grad).
        if mode == "fwd":
            rec.extra["note"] = "Liger has no forward-only path: this time includes its gradient GEMMs"

        def f():
            return loss_fn(h.view(b, seq_len, -1), w, t.view(b, seq_len), mask.view(b, seq_len).long(),
                           seq_adv, ref_per_token_logps=ref.view(b, seq_len),
                           old_per_token_logps=old.view(b, seq_len))[0]  # fmt: skip

    mult = 2 if mode == "fwd" else 6
    run_case(benchmark, run, rec, f, [h, w], matmul_flops=mult * shape["N"] * shape["H"] * shape["V"])
    if run.ci:  # the same loss as float64 math on the same inputs
        expected = naive(h.double(), w.double(), t, old.double(), adv.double(), mask, ref.double())
        assert_close(f(), expected, 1e-2, method)


RAW_T = 0.7  # the 7B recipe's rollout temperature
RAW_METHODS = ["rlcs_triton_two_pass", "rlcs_triton_one_pass"]  # the baseline first: the ratio needs it


@pytest.mark.parametrize("method", RAW_METHODS)
def test_raw_logprobs_on_policy_update(benchmark, bench_run, shape, method):
    # The on-policy update at T != 1 hands rollout/logprob_diff the log-probs at T = 1: a no-grad lm-head
    # pass beside the loss (before) or a second log-sum-exp in the loss's own pass (raw_logprobs_out).
    run = bench_run
    rec = Record("fused_linear_grpo_loss", "fwd+bwd", method, shape["model"], shape["N"], shape["H"],
                 shape["V"], variant=f"+raw (T={RAW_T}, on-policy)")
    h, w, t, _, seq_adv, mask, ref, seq_len = inputs(run, shape, grad=True)
    adv = seq_adv.repeat_interleave(seq_len)
    raw = torch.empty(shape["N"], device=run.device)
    options = dict(OPTIONS, temperature=RAW_T, with_entropy=True, impl=run.impl)
    if method == "rlcs_triton_two_pass":
        def f():
            with torch.no_grad():
                raw.copy_(fused_linear_logprob(h.detach(), w.detach(), t, impl=run.impl))
            return fused_linear_grpo_loss(h, w, t, None, adv, mask, ref_logprobs=ref, **options)[0]
        passes = 4  # logits twice, dh, dW
    else:
        def f():
            return fused_linear_grpo_loss(h, w, t, None, adv, mask, ref_logprobs=ref, raw_logprobs_out=raw,
                                          **options)[0]  # fmt: skip
        passes = 3
    run_case(benchmark, run, rec, f, [h, w], matmul_flops=2 * passes * shape["N"] * shape["H"] * shape["V"])
    base = next((r for r in run.records if r.op == rec.op and r.variant == rec.variant
                 and r.method == "rlcs_triton_two_pass" and (r.model, r.N) == (rec.model, rec.N)), None)
    if method == "rlcs_triton_one_pass" and base is not None and base.median_ms and rec.median_ms:
        rec.extra["speedup_vs_two_pass"] = base.median_ms / rec.median_ms
    if run.ci:
        f()
        want = torch.log_softmax(h.double() @ w.double().t(), -1).gather(1, t[:, None])[:, 0]
        assert_close(raw, want, 1e-2, f"{method} T=1")
