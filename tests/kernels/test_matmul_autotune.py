"""The backward GEMMs tune once per token-count bucket, not once per micro-batch, and never clone dW.

On a GPU every new autotune key benchmarks every config (≈ 0.75 s per micro-batch at 7B), and the token
count of the chunked dh / dW GEMMs changes with nearly every micro-batch. Here the real autotuner object
(``matmul_autotuner``) wraps the interpreted kernel, with a timer that runs each trial once and ranks
configs by a fixed order, so its key function and its cache are the ones a GPU run uses.
"""

import math

import pytest
import torch
from rlcs_fast.kernels import _common

H, V = 24, 40
MAX_TOKENS = 300  # token counts drawn in [1, MAX_TOKENS]


@pytest.fixture
def tuner(monkeypatch):
    trials = []

    def do_bench(kernel_call, quantiles):
        kernel_call()  # a real trial run: an accumulating trial would compound into C and fail the values
        trials.append(1)
        return [float(len(trials) % 3)] * len(quantiles)

    t = _common.matmul_autotuner(do_bench=do_bench)
    monkeypatch.setattr(_common, "_matmul_tuned", t)
    t.trials = trials
    return t


@pytest.mark.slow
def test_random_token_counts_tune_a_bounded_number_of_keys(tuner):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g)
    dw = torch.empty(V, H)
    dw64 = torch.zeros(V, H, dtype=torch.float64)
    counts = torch.randint(1, MAX_TOKENS + 1, (20,), generator=g).tolist()
    assert len(set(counts)) > 12  # the old exact-M/K key would tune > 24 times
    for i, n in enumerate(counts):
        dl, h = torch.randn(n, V, generator=g), torch.randn(n, H, generator=g)
        dh = torch.empty(n, H)
        _common.linear_backward_chunk(dl, h, weight, dh, dw, first=i == 0, via_triton=True)
        dw64 += dl.double().t() @ h.double()
        torch.testing.assert_close(dh.double(), dl.double() @ weight.double(), rtol=1e-5, atol=1e-5)
    # Every dW += dlᵀh after the first ran untuned and untouched by trials: dW is exact.
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-4)
    # dh (M = tokens) and dW's first chunk (K = tokens): one key per power of two from 16 to MAX_TOKENS.
    buckets = int(math.log2(_common.token_bucket(MAX_TOKENS) // 16)) + 1
    assert len(tuner.cache) <= buckets + 1, sorted(tuner.cache)
    assert len(tuner.trials) == len(tuner.cache) * len(_common.MATMUL_CONFIGS)
    assert not tuner.restore_value, "tuning must not clone the output"


def test_key_is_the_bucket_not_the_count(tuner):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(V, H, generator=g)
    for n in (65, 100, 128):  # one bucket: 128
        dl = torch.randn(n, V, generator=g)
        _common.matmul_into(dl, weight, torch.empty(n, H), accumulate=False)
    assert len(tuner.cache) == 1
    assert [_common.token_bucket(n) for n in (1, 16, 17, 128, 129)] == [16, 16, 32, 128, 256]
