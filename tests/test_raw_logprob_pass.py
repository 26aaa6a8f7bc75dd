"""At a rollout temperature != 1 the trainer needs the old policy's log-probs at T = 1 too (engines report
raw log-probs; ``rollout/logprob_diff`` compares like with like). Both heads that produce them, the
old-policy pass (``logprob_head(with_raw=True)``) and the on-policy update (``grpo_head(raw_out=...)``),
take them from the same lm-head pass as the log-probs at the temperature: one logits GEMM over the
vocabulary per token chunk, not two. The values equal the separate pass at T = 1 they replace."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rlcs_fast.kernels import fused_linear_logprob
from torch.utils._python_dispatch import TorchDispatchMode

from rlcs_fast.config import GRPOConfig
from rlcs_fast.grpo import grpo_head, logprob_head

N, H, V, T = 45, 24, 96, 0.7


class _LogitGEMMs(TorchDispatchMode):
    """Counts lm-head passes: matmuls whose output has the vocabulary as its last dimension."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "matmul", "addmm", "bmm") and out.shape[-1] == V:
            self.count += 1
        return out


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets, g


def test_old_policy_head_takes_raw_logprobs_from_the_same_pass():
    hidden, weight, targets, _ = _inputs(0)
    with _LogitGEMMs() as probe, torch.no_grad():
        out = logprob_head(targets, T, "torch", with_raw=True)(hidden, weight)
    assert probe.count == 1  # one token chunk, one logits GEMM (two before: a second pass at T = 1)
    assert out.shape == (N, 2)
    torch.testing.assert_close(out[:, 0], fused_linear_logprob(hidden, weight, targets, temperature=T,
                                                               impl="torch"))
    torch.testing.assert_close(out[:, 1], fused_linear_logprob(hidden, weight, targets, impl="torch"),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_update_head_takes_raw_logprobs_from_the_same_pass(impl):
    hidden, weight, targets, g = _inputs(1)
    grpo = dataclasses.replace(GRPOConfig(), temperature=T, kl_coef=0.0)
    adv = torch.randn(N, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    seq_ids = torch.arange(N) // 15
    lp_out, raw_out = torch.full((N,), float("nan")), torch.full((N,), float("nan"))
    head = grpo_head(grpo, targets, None, adv, mask, None, seq_ids, None, 3, impl, lp_out, raw_out)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LogitGEMMs() as probe:
        loss, _ = head(h, w)
    if impl == "torch":
        assert probe.count == 1  # the loss's own logits GEMM only (two before)
    loss.backward()
    torch.testing.assert_close(raw_out, fused_linear_logprob(hidden, weight, targets, impl="torch"),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp_out, fused_linear_logprob(hidden, weight, targets, temperature=T,
                                                            impl="torch"), rtol=1e-6, atol=1e-5)
