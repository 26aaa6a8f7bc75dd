"""The rlcs_varlen attention backend against float64 references, and its wiring into transformers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration
from transformers.masking_utils import AttentionMaskInterface

from rlcs_fast.attention import (
    ATTENTION_NAME,
    apply_attention,
    rlcs_attention_forward,
    select_attention,
    varlen_attention,
)
from rlcs_fast.tiny import SPECIAL_IDS, tiny_config


def reference_attention(q, k, v, cu, *, causal: bool, scale: float) -> torch.Tensor:
    """Float64 softmax attention per segment, [T, Hq, D] with GQA by head grouping."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        for h in range(q.shape[1]):
            s = q[a:b, h] @ k[a:b, h // group].T * scale  # [l, l]
            if causal:
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
            out[a:b, h] = torch.softmax(s, -1) @ v[a:b, h // group]
    return out


def random_qkv(gen: torch.Generator, lengths: list[int], hq: int, hkv: int, d: int = 16):
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=gen, requires_grad=True) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_varlen_sdpa_matches_float64(causal: bool, hq: int, hkv: int) -> None:
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    lengths = [5, 1, 17, 8]
    q, k, v, cu = random_qkv(gen, lengths, hq, hkv)
    scale = 16**-0.5
    out = varlen_attention(
        q, k, v, cu, cu, max(lengths), max(lengths), scale=scale, causal=causal, backend="sdpa_packed"
    )
    want = reference_attention(q, k, v, cu, causal=causal, scale=scale)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    # Gradients too: the backward is what training relies on.
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)


def test_packed_sequences_do_not_see_each_other() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, cu = random_qkv(gen, [6, 9], 4, 2)
    out = varlen_attention(q, k, v, cu, cu, 9, 9, scale=None, causal=True, backend="sdpa_packed")
    v2 = v.detach().clone()
    v2[:6] += 100.0  # change only the first sequence's values
    out2 = varlen_attention(q, k, v2, cu, cu, 9, 9, scale=None, causal=True, backend="sdpa_packed")
    torch.testing.assert_close(out2[6:], out[6:], rtol=0, atol=0)
    assert (out2[:6] - out[:6]).abs().min() > 1.0


class _Layer(torch.nn.Module):
    is_causal = True
    scaling = 0.25


def to_hf(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [1, H, T, D], transformers' layout
    return x.transpose(0, 1)[None]


def test_packed_boundaries_from_positions_without_precomputed_kwargs() -> None:
    """A packed batch whose caller forgot cu_seq_lens must still not attend across sequences."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, cu = random_qkv(gen, [7, 4, 10], 4, 2)
    positions = torch.cat([torch.arange(n) for n in (7, 4, 10)])[None]
    out, _ = rlcs_attention_forward(
        _Layer(), to_hf(q), to_hf(k), to_hf(v), None, scaling=0.25, position_ids=positions
    )
    want = reference_attention(q, k, v, cu, causal=True, scale=0.25)
    torch.testing.assert_close(out[0].double(), want, rtol=0, atol=1e-5)
    given, _ = rlcs_attention_forward(
        _Layer(),
        to_hf(q),
        to_hf(k),
        to_hf(v),
        None,
        scaling=0.25,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=10,
        max_length_k=10,
    )
    torch.testing.assert_close(given, out, rtol=0, atol=0)


def test_dense_path_padding_and_kv_cache_alignment() -> None:
    """Generation path: left padding (2-D mask) and queries that are the last rows of a longer KV
    (a cache) — causal aligned bottom-right, padded keys never attended."""
    gen = torch.Generator().manual_seed(2)
    b, hq, hkv, lk, lq, d = 2, 4, 2, 9, 3, 8
    q = torch.randn(b, hq, lq, d, generator=gen)
    k, v = torch.randn(b, hkv, lk, d, generator=gen), torch.randn(b, hkv, lk, d, generator=gen)
    pad = torch.ones(b, lk, dtype=torch.bool)
    pad[1, :4] = False  # row 1 left-padded by 4
    out, _ = rlcs_attention_forward(_Layer(), q, k, v, pad, scaling=0.25)  # [B, Lq, H, D]
    for i in range(b):
        for h in range(hq):
            s = q[i, h].double() @ k[i, h // 2].double().T * 0.25  # [lq, lk]
            allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) & pad[i]
            want = torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v[i, h // 2].double()
            torch.testing.assert_close(out[i, :, h].double(), want, rtol=0, atol=1e-5)
    # A fully padded query row (left padding at prefill) gives finite output, not NaN.
    full, _ = rlcs_attention_forward(_Layer(), k.repeat(1, 2, 1, 1), k, v, pad, scaling=0.25)
    assert torch.isfinite(full).all()


def test_select_attention_on_this_machine() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU expectations")
    assert select_attention() == "sdpa_packed"
    assert select_attention("sdpa_packed") == "sdpa_packed"
    for name in ("flash", "torch_varlen"):
        with pytest.raises(ValueError, match="model.attention"):
            select_attention(name)
    with pytest.raises(ValueError, match="model.attention = 'flash_attention_2' is not one of"):
        select_attention("flash_attention_2")


def test_apply_attention_sets_text_and_vision() -> None:
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    assert apply_attention(model, "sdpa_packed") == f"{ATTENTION_NAME}/sdpa_packed"
    assert "flash" not in ATTENTION_NAME  # transformers 5.x would try to download a hub kernel
    assert model.config.text_config._attn_implementation == ATTENTION_NAME
    assert model.config.vision_config._attn_implementation == ATTENTION_NAME
    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert ATTENTION_NAME in AttentionMaskInterface._global_mapping  # no dense L×L mask is built
    assert all(
        blk.attn.forward.__func__.__name__ == "_vision_attention_forward" for blk in model.model.visual.blocks
    )
    with pytest.raises(ValueError, match="select_attention"):
        apply_attention(model, "auto")


def test_generation_with_padding_matches_stock_sdpa() -> None:
    """The HF rollout engine may generate with this backend: a left-padded batch must give the same
    tokens and scores as transformers' own sdpa."""
    torch.manual_seed(0)
    ref = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    model = copy.deepcopy(ref)
    apply_attention(model, "sdpa_packed")
    pad_id = SPECIAL_IDS["<|endoftext|>"]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = pad_id, 0
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    want, got = ref.generate(**kw), model.generate(**kw)
    torch.testing.assert_close(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_backends_match_sdpa_packed(causal: bool) -> None:
    backend = select_attention()
    if backend == "sdpa_packed":
        pytest.skip("neither flash-attn nor torch varlen attention is available")
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu = random_qkv(gen, [37, 5, 128, 64], 8, 2, d=64)
    q, k, v = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v))
    cu = cu.cuda()
    out = varlen_attention(q, k, v, cu, cu, 128, 128, scale=None, causal=causal, backend=backend)
    want = reference_attention(
        q.float().cpu(), k.float().cpu(), v.float().cpu(), cu.cpu(), causal=causal, scale=64**-0.5
    )
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=2e-2)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("have", ["flash", "torch_varlen", "none"])
def test_auto_on_cuda_says_which_backend_and_why(monkeypatch, caplog, have) -> None:
    """On a GPU without flash-attn and with torch < 2.11, ``auto`` fell back to per-sequence SDPA without
    a word; every choice is now reported, the slow one as a warning naming the fix (CUDA mocked)."""
    import logging

    from rlcs_fast import attention

    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", lambda: object() if have == "flash" else None)
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: object() if have != "none" else None)
    monkeypatch.setattr(attention, "_REPORTED", set())
    monkeypatch.setitem(attention._WHY_NOT, "flash", "ImportError: undefined symbol _ZN3c10")
    with caplog.at_level(logging.INFO, logger="rlcs_fast"):
        choice = select_attention("auto")
    assert choice == {"flash": "flash", "torch_varlen": "torch_varlen", "none": "sdpa_packed"}[have]
    said = [r for r in caplog.records if r.name == "rlcs_fast" and "model.attention = auto" in r.getMessage()]
    assert len(said) == 1 and choice in said[0].getMessage(), caplog.text
    if have != "flash":
        assert said[0].levelno == logging.WARNING and "undefined symbol" in said[0].getMessage()
    if have == "none":
        assert "SLOW" in said[0].getMessage() and "torch >= 2.11" in said[0].getMessage()
