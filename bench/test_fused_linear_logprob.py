"""Fused lm-head log-prob (+ entropy): ``rlcs_fast.kernels.fused_linear_logprob`` against the chunked torch
reference, a naive eager ``logits = h @ W.T; log_softmax; gather``, ``torch.compile`` of the naive version,
and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (per-token CE = −log-prob; it has no entropy
output, so that column is skipped for "+entropy"). Forward (old/ref log-probs) and forward+backward (SFT).
"""

from __future__ import annotations

import pytest
import torch
from benchlib import Record, assert_close, compiled, liger_or_skip, run_case, skip
from rlcs_fast.kernels import fused_linear_logprob, fused_linear_logprob_reference

METHODS = ["rlcs_triton", "torch_chunked", "eager_naive", "compile_naive", "liger"]


def naive(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, with_entropy: bool):
    logp = torch.log_softmax((h @ w.t()).float(), dim=-1)  # [N, V]: what the fused op never holds
    lp = logp.gather(1, t[:, None])[:, 0]
    if not with_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)


def inputs(run, shape: dict, grad: bool):
    n, h, v = shape["N"], shape["H"], shape["V"]
    g = run.generator(0)
    hidden = torch.randn(n, h, device=run.device, generator=g).to(run.dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, device=run.device, generator=g) * h**-0.5).to(run.dtype).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), device=run.device, generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logprob", "logprob+entropy"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_linear_logprob(benchmark, bench_run, shape, method, mode, with_entropy):
    run = bench_run
    rec = Record("fused_linear_logprob", mode, method, shape["model"], shape["N"], shape["H"], shape["V"],
                 variant="+entropy" if with_entropy else "")
    h, w, t = inputs(run, shape, grad=mode == "fwd+bwd")
    if method == "rlcs_triton":
        def f():
            return fused_linear_logprob(h, w, t, with_entropy=with_entropy, impl=run.impl)
    elif method == "torch_chunked":
        def f():
            return fused_linear_logprob_reference(h, w, t, with_entropy=with_entropy)
    elif method == "eager_naive":
        def f():
            return naive(h, w, t, with_entropy)
    elif method == "compile_naive":
        fc = compiled(naive, run.compile_backend)

        def f():
            return fc(h, w, t, with_entropy)
    else:
        if with_entropy:
            skip(rec, run.records, "Liger's fused linear cross-entropy has no entropy output")
            pytest.skip(rec.reason)
        liger = liger_or_skip(rec, run.records, "liger_kernel.transformers")
        ce = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")

        def f():
            return -ce(w, h, t)

    def loss():
        out = f()
        return out[0].sum() + out[1].sum() if with_entropy else out.sum()

    mult = 2 if mode == "fwd" else 6  # logits; + dh and dW
    run_case(benchmark, run, rec, loss if mode == "fwd+bwd" else f, [h, w],
             matmul_flops=mult * shape["N"] * shape["H"] * shape["V"])
    if run.ci:  # every method must compute the same function as float64 math on the same inputs
        out, ref = f(), naive(h.double(), w.double(), t, with_entropy)
        outs, refs = (out, ref) if with_entropy else ((out,), (ref,))
        for a, e, name in zip(outs, refs, ("logprob", "entropy")):
            assert_close(a, e, 1e-2, f"{method} {name}")


RAW_T = 0.7  # the 7B recipe's rollout temperature
RAW_METHODS = ["rlcs_triton_two_pass", "rlcs_triton_one_pass"]  # the baseline first: the ratio needs it


@pytest.mark.parametrize("method", RAW_METHODS)
def test_raw_logprobs(benchmark, bench_run, shape, method):
    # The old-policy pass at T != 1 also needs the log-probs at T = 1 (engines report those): a second
    # lm-head pass (before) or a second log-sum-exp of the same logit tiles (raw_logprobs_out).
    run = bench_run
    rec = Record("fused_linear_logprob", "fwd", method, shape["model"], shape["N"], shape["H"], shape["V"],
                 variant=f"+raw (T={RAW_T})")
    h, w, t = inputs(run, shape, grad=False)
    raw = torch.empty(shape["N"], device=run.device)
    if method == "rlcs_triton_two_pass":
        def f():
            lp = fused_linear_logprob(h, w, t, temperature=RAW_T, impl=run.impl)
            raw.copy_(fused_linear_logprob(h, w, t, impl=run.impl))
            return lp
        passes = 2
    else:
        def f():
            return fused_linear_logprob(h, w, t, temperature=RAW_T, impl=run.impl, raw_logprobs_out=raw)
        passes = 1
    run_case(benchmark, run, rec, f, [h, w], matmul_flops=2 * passes * shape["N"] * shape["H"] * shape["V"])
    base = next((r for r in run.records if r.op == rec.op and r.variant == rec.variant
                 and r.method == "rlcs_triton_two_pass" and (r.model, r.N) == (rec.model, rec.N)), None)
    if method == "rlcs_triton_one_pass" and base is not None and base.median_ms and rec.median_ms:
        rec.extra["speedup_vs_two_pass"] = base.median_ms / rec.median_ms
    if run.ci:
        lp = f()
        logits = h.double() @ w.double().t()
        for got, temp in ((lp, RAW_T), (raw, 1.0)):
            want = torch.log_softmax(logits / temp, -1).gather(1, t[:, None])[:, 0]
            assert_close(got, want, 1e-2, f"{method} T={temp}")
