"""The GRPO policy loss on packed log-probs: ``rlcs_fast.kernels.grpo_loss`` (one Triton pass) against the
eager torch reference (verl's formulas) and ``torch.compile`` of it, with the recipe's options (clip 0.2 /
0.28, ``low_var_kl`` at 1e-2, token-mean). Elementwise, so bounded by bytes, not FLOPs: the floor is the
bytes read and written at the copy bandwidth measured in the same run. (Liger-Kernel's ``triton_grpo_loss``
starts from [B, T, V] logits, a different op: Liger is compared in the fused linear GRPO benchmark.)
"""

from __future__ import annotations

import pytest
import torch
from benchlib import SEQ_LEN, Record, assert_close, compiled, run_case
from rlcs_fast.kernels import grpo_loss, grpo_loss_reference

METHODS = ["rlcs_triton", "eager_reference", "compile_reference"]
OPTIONS = dict(clip_low=0.2, clip_high=0.28, kl_coef=1e-2, kl_type="low_var_kl", agg="token_mean")


def inputs(run, n: int, grad: bool):
    g = run.generator(0)
    dev = run.device
    seq_len = SEQ_LEN if not run.ci else n // 4
    logprobs = (-torch.rand(n, device=dev, generator=g) * 3).requires_grad_(grad)
    old = logprobs.detach() + 0.1 * torch.randn(n, device=dev, generator=g)
    ref = logprobs.detach() + 0.1 * torch.randn(n, device=dev, generator=g)
    adv = torch.randn(n // seq_len, device=dev, generator=g).repeat_interleave(seq_len)
    mask = torch.rand(n, device=dev, generator=g) < 0.9
    return logprobs, old, adv, mask, ref


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS)
def test_grpo_loss(benchmark, bench_run, n_tokens, method, mode):
    run = bench_run
    rec = Record("grpo_loss", mode, method, "any", n_tokens, 0, 0)
    lp, old, adv, mask, ref = inputs(run, n_tokens, grad=mode == "fwd+bwd")
    if method == "rlcs_triton":
        def f():
            return grpo_loss(lp, old, adv, mask, ref_logprobs=ref, impl=run.impl, **OPTIONS)[0]
    elif method == "eager_reference":
        def f():
            return grpo_loss_reference(lp, old, adv, mask, ref_logprobs=ref, **OPTIONS)[0]
    else:
        fc = compiled(grpo_loss_reference, run.compile_backend)

        def f():
            return fc(lp, old, adv, mask, ref_logprobs=ref, **OPTIONS)[0]

    # read log-probs, old, ref, advantages (fp32) and the mask (1 B); backward writes the fp32 gradient
    bytes_moved = n_tokens * (4 * 4 + 1) + (n_tokens * 4 if mode == "fwd+bwd" else 0)
    run_case(benchmark, run, rec, f, [lp], bytes_moved=bytes_moved)
    if run.ci:
        expected = grpo_loss_reference(lp.double(), old.double(), adv.double(), mask,
                                       ref_logprobs=ref.double(), **OPTIONS)[0]  # fmt: skip
        assert_close(f(), expected, 1e-5, method)
