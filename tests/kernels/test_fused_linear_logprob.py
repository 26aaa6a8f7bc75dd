"""fused_linear_logprob (Triton under the interpreter, and the chunked torch fallback) vs float64 torch."""

import importlib

import pytest
import torch
from rlcs_fast.kernels import fused_linear_logprob, fused_linear_logprob_reference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

IMPLS = ["triton", "torch"]


def _inputs(n, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.6).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets, g


def _float64(hidden, weight, targets, temperature):
    """Naive float64 log-softmax over the full [N, V] logits: the ground truth."""
    logp = torch.log_softmax((hidden.double() @ weight.double().t()) / temperature, dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,temperature,with_entropy",
    [(torch.float32, 1.0, False), (torch.float32, 0.7, True), (torch.bfloat16, 1.3, True),
     (torch.bfloat16, 1.0, False)],
)
def test_values_and_gradients_match_float64(impl, dtype, temperature, with_entropy):
    # N, H, V are not multiples of the interpreter blocks (16, 16, 32); chunk 16 gives 3 backward chunks.
    hidden, weight, targets, g = _inputs(37, 48, 100, dtype, seed=1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_logprob(h, w, targets, temperature=temperature, with_entropy=with_entropy,
                               chunk_size=16, impl=impl)
    lp, ent = out if with_entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == (37,)
    g_lp, g_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    ((lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)).backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64, ent64 = _float64(h64, w64, targets, temperature)
    ((lp64 * g_lp.double()).sum() + ((ent64 * g_ent.double()).sum() if with_entropy else 0)).backward()

    # Values: bf16 inputs are exact in float32/64, so only accumulation order differs.
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=2e-5)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=2e-5)
    # Gradients: bf16 runs round dlogits and the returned gradients to bf16 (8-bit mantissa).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert _rel(h.grad, h64.grad) < tol
    assert _rel(w.grad, w64.grad) < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token(impl):
    hidden, weight, targets, _ = _inputs(1, 20, 70, torch.float32, seed=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fused_linear_logprob(h, w, targets, with_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64, ent64 = _float64(h64, w64, targets, 1.0)
    (lp64.sum() + ent64.sum()).backward()
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=1e-5)
    assert _rel(h.grad, h64.grad) < 1e-5 and _rel(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_tokens_get_exactly_zero_gradient(impl):
    hidden, weight, targets, g = _inputs(29, 24, 50, torch.float32, seed=3)
    mask = torch.rand(29, generator=g) > 0.4
    h = hidden.clone().requires_grad_()
    lp, ent = fused_linear_logprob(h, weight, targets, with_entropy=True, chunk_size=8, impl=impl)
    (-(lp * mask).sum() / mask.sum() + 0.1 * (ent * mask).sum()).backward()
    assert torch.all(h.grad[~mask] == 0)
    assert torch.all(h.grad[mask].abs().sum(-1) > 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_accumulates_both_gradients(impl):
    # The same [V, H] tensor embeds the input ids and is the lm_head: its gradient is the sum of both uses.
    _, weight, targets, g = _inputs(23, 32, 64, torch.float32, seed=4)
    ids = torch.randint(0, 64, (23,), generator=g)
    mix = torch.randn(32, 32, generator=g) / 32**0.5

    def loss_fn(w, logprob):
        hidden = torch.tanh(w[ids] @ mix)
        return -logprob(hidden, w).mean()

    w = weight.clone().requires_grad_()
    loss_fn(w, lambda hd, ww: fused_linear_logprob(hd, ww, targets, chunk_size=8, impl=impl)).backward()
    w64 = weight.double().requires_grad_()
    mix = mix.double()
    loss_fn(w64, lambda hd, ww: _float64(hd, ww, targets, 1.0)[0]).backward()
    assert _rel(w.grad, w64.grad) < 1e-5


def test_sft_cross_entropy_is_mean_negative_logprob():
    hidden, weight, targets, _ = _inputs(19, 16, 40, torch.float32, seed=5)
    lp = fused_linear_logprob(hidden, weight, targets)
    ce = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(-lp.mean(), ce, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Largest tensor any out-of-place op creates (in-place ops such as the interpreter's copies allocate
    nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.endswith("_"):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_never_allocates_full_logits(impl):
    n, h, v, chunk = 96, 16, 100, 16
    hidden, weight, targets, _ = _inputs(n, h, v, torch.float32, seed=6)
    hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as probe:
        lp, ent = fused_linear_logprob(hd, w, targets, with_entropy=True, chunk_size=chunk, impl=impl)
        (lp.sum() + ent.sum()).backward()
    assert probe.largest <= max(chunk * v, v * h, n * h) < n * v


def test_reference_is_the_torch_impl():
    hidden, weight, targets, _ = _inputs(10, 8, 30, torch.float32, seed=7)
    a = fused_linear_logprob_reference(hidden, weight, targets, temperature=0.5)
    b = fused_linear_logprob(hidden, weight, targets, temperature=0.5, impl="torch")
    assert torch.equal(a, b)


class _LogitGEMMs(TorchDispatchMode):
    """Counts the matmuls whose output has the vocabulary as its last dimension: lm-head passes."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "matmul", "addmm", "bmm") and out.shape[-1] == self.vocab:
            self.count += 1
        return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,temperature,with_entropy",
    [(torch.float32, 0.7, False), (torch.bfloat16, 1.3, True), (torch.float32, 1.0, True)],
)
def test_raw_logprobs_at_t1_in_the_same_pass(impl, dtype, temperature, with_entropy):
    # The log-probs at T = 1 (what engines report) come out of the pass that computes those at
    # `temperature`: float64 values at T = 1, and the op's own outputs and gradients unchanged.
    hidden, weight, targets, g = _inputs(37, 48, 100, dtype, seed=11)
    targets[5] = 100  # out of range: -lse, as the log-prob at `temperature`
    raw = torch.full((37,), float("nan"))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out1 = fused_linear_logprob(h1, w1, targets, temperature=temperature, with_entropy=with_entropy,
                                chunk_size=16, impl=impl, raw_logprobs_out=raw)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_linear_logprob(h2, w2, targets, temperature=temperature, with_entropy=with_entropy,
                                chunk_size=16, impl=impl)
    g_lp = torch.randn(37, generator=g)
    for out, grad_ent in ((out1, 1.0), (out2, 1.0)):
        lp, ent = out if with_entropy else (out, None)
        ((lp * g_lp).sum() + (grad_ent * ent.sum() if with_entropy else 0)).backward()
    for a, b in zip(out1 if with_entropy else (out1,), out2 if with_entropy else (out2,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)

    h64, w64 = hidden.double(), weight.double()
    logp = torch.log_softmax(h64 @ w64.t(), dim=-1)
    raw64 = logp.gather(1, targets.clamp(max=99)[:, None])[:, 0]
    raw64[5] = -torch.logsumexp(h64[5] @ w64.t(), dim=-1)
    assert raw.dtype == torch.float32 and not raw.requires_grad
    torch.testing.assert_close(raw.double(), raw64, rtol=0, atol=2e-5)
    if temperature != 1.0:  # the two distributions really differ, so the test tells them apart
        assert (raw.double() - out2[0 if with_entropy else slice(None)].double()).abs().max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_raw_logprobs_cost_no_second_lm_head_pass(impl, monkeypatch):
    # One logits GEMM per token chunk with or without the T = 1 log-probs (torch path), one launch of the
    # stats kernel per call (Triton path): the second log-sum-exp reads the same logit tiles.
    fll = importlib.import_module("rlcs_fast.kernels.fused_linear_logprob")
    hidden, weight, targets, _ = _inputs(40, 16, 64, torch.float32, seed=12)
    launches, real = [], fll.launch

    def counted(kernel, *args, **kwargs):
        launches.append(kernel)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(fll, "launch", counted)
    counts = []
    for raw in (None, torch.empty(40)):
        launches.clear()
        with _LogitGEMMs(64) as probe, torch.no_grad():
            fused_linear_logprob(hidden, weight, targets, temperature=0.7, chunk_size=16, impl=impl,
                                 raw_logprobs_out=raw)
        counts.append((probe.count, launches.count(fll._stats_kernel)))
    assert counts[0] == counts[1], counts
    assert counts[0] == ((3, 0) if impl == "torch" else (0, 1)), counts
