"""Padding-free attention for packed Qwen2.5-VL training.

One function is registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME``
(``"rlcs_varlen"``), with transformers' own ``flash_attention_mask`` registered under the same name in
``AttentionMaskInterface``, so the model never builds an L×L mask: packed batches carry their sequence
boundaries as ``cu_seq_lens_q/k`` (computed on the host by ``rlcs_fast.packing.pack``) and every layer
runs one variable-length attention call over them.

Why not a stock implementation name:
- ``sdpa``/``eager`` turn packing into a dense block-diagonal L×L mask (quadratic memory, no block
  skipping: 1.3× slower than unpacked on equal-length batches, UniRL#40).
- Any name containing "flash" makes transformers 5.x try to fetch a hub kernel at load time (offline GPU
  machines fail), and ``flash_attention_2`` needs the flash-attn package at model construction.
- A non-"flash" name sends the ViT into a Python loop of one attention call per window and frame
  (``Qwen2_5_VLVisionAttention.forward``); ``apply_attention`` therefore patches the vision attention of
  the model it is given to make one varlen call over the tower's own ``cu_seqlens``.

Backends (chosen once by ``select_attention``; the tensors' device decides at call time):
- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA).
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA only; causal through
  ``window_size=(-1, 0)``, torch >= 2.11).
- ``"sdpa_packed"``: one ``F.scaled_dot_product_attention`` per ``cu_seqlens`` segment. Exact, and the
  only choice on CPU; on CUDA it costs one kernel launch per sequence.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("rlcs_fast")

ATTENTION_NAME = "rlcs_varlen"
BACKENDS = ("flash", "torch_varlen", "sdpa_packed")
# Attribute set on every attention module by `apply_attention`: per-model choice, survives FSDP2
# (fully_shard swaps the class, not the instance attributes).
_BACKEND_ATTR = "rlcs_attention_backend"


@functools.cache
def _flash_attn_varlen_func() -> Any | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        _WHY_NOT["flash"] = f"{type(e).__name__}: {e}"
        return None
    return flash_attn_varlen_func


_WHY_NOT: dict[str, str] = {}  # backend -> why it cannot run here (for the "auto" report)


@functools.cache
def _torch_varlen_attn() -> Any | None:
    """torch's varlen_attn if it can do causal attention (``window_size``, torch >= 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None  # 2.10 had `is_causal` and no GQA; not worth a second code path
    return varlen_attn


@functools.cache
def _torch_varlen_has_gqa() -> bool:
    fn = _torch_varlen_attn()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


def select_attention(requested: str = "auto") -> str:
    """Resolve the config value ``model.attention`` to a backend name in ``BACKENDS``.

    ``"auto"`` takes the fastest one available: flash-attn, then torch's varlen attention (CUDA), then
    per-segment SDPA. A named backend that cannot run here is an error, not a silent fallback."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        choice = ("flash" if cuda and _flash_attn_varlen_func() is not None else
                  "torch_varlen" if cuda and _torch_varlen_attn() is not None else "sdpa_packed")
        if cuda:  # a slow fallback on a GPU is never silent
            _report_auto(choice)
        return choice
    if requested == "flash":
        if _flash_attn_varlen_func() is None:
            raise ValueError(
                "model.attention = 'flash' needs the flash-attn package (pip install 'rlcs-fast[flash]', "
                "built against this torch and CUDA); use model.attention = 'auto' to pick what is installed"
            )
        if not cuda:
            raise ValueError("model.attention = 'flash' needs a CUDA GPU; use 'auto' or 'sdpa_packed' on CPU")
        return "flash"
    if requested == "torch_varlen":
        if _torch_varlen_attn() is None:
            raise ValueError(
                "model.attention = 'torch_varlen' needs torch >= 2.11 "
                "(torch.nn.attention.varlen.varlen_attn "
                f"with window_size); this is torch {torch.__version__}. Use model.attention = 'auto'"
            )
        if not cuda:
            raise ValueError(
                "model.attention = 'torch_varlen' is CUDA-only; use 'auto' or 'sdpa_packed' on CPU"
            )
        return "torch_varlen"
    if requested == "sdpa_packed":
        return "sdpa_packed"
    raise ValueError(f"model.attention = {requested!r} is not one of {('auto', *BACKENDS)}")


def _report_auto(choice: str) -> None:
    """Say which backend ``model.attention = "auto"`` chose on CUDA and why (once per choice)."""
    if choice in _REPORTED:
        return
    _REPORTED.add(choice)
    flash_why = _WHY_NOT.get("flash", "flash-attn is not installed")
    varlen_why = (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn with window_size "
                  "(torch >= 2.11)")
    if choice == "flash":
        log.info("model.attention = auto: flash (flash-attn varlen kernels)")
    elif choice == "torch_varlen":
        log.warning("model.attention = auto: torch_varlen, because flash-attn cannot be used (%s). Install "
                    "flash-attn for the fastest path, or set model.attention = 'torch_varlen' to silence "
                    "this.", flash_why)
    else:
        log.warning("model.attention = auto: SLOW FALLBACK sdpa_packed on CUDA (one SDPA launch per sequence "
                    "and a host sync per attention call), because flash-attn cannot be used (%s) and %s. "
                    "Fix: install flash-attn or torch >= 2.11; or set model.attention = 'sdpa_packed' to "
                    "choose it explicitly.", flash_why, varlen_why)


_REPORTED: set[str] = set()


def _sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None,
    causal: bool,
    dropout: float,
    key_padding: Tensor | None = None,
) -> Tensor:
    """SDPA on [B, H, Lq, D] / [B, Hkv, Lk, D]. Causal is aligned bottom-right (query i is the key
    Lk - Lq + i), as flash-attn and a KV cache need; SDPA's own ``is_causal`` aligns top-left, so it is
    used only when Lq == Lk. ``key_padding`` [B, Lk] bool, True = real token."""
    lq, lk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    mask = None
    if causal and lq > 1 and (lq != lk or key_padding is not None):
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if key_padding is not None:
        pad = key_padding[:, None, None, :].to(torch.bool)
        mask = pad if mask is None else pad & mask
        # A left-padding query sees no key at all: let it see every key so its (unused) output is finite
        # instead of NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    use_is_causal = causal and lq > 1 and mask is None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_is_causal, scale=scale, enable_gqa=gqa
    )


def varlen_attention(
    q: Tensor,  # [T, Hq, D] packed queries
    k: Tensor,  # [T, Hkv, D]
    v: Tensor,  # [T, Hkv, D]
    cu_seqlens_q: Tensor,  # [S+1] int32
    cu_seqlens_k: Tensor,  # [S+1] int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None,
    causal: bool,
    backend: str,
    dropout: float = 0.0,
) -> Tensor:
    """Attention within each ``cu_seqlens`` segment, none across segments → [T, Hq, D]. GQA (Hq a
    multiple of Hkv) is handled by every backend."""
    if q.is_cuda and backend == "flash":
        return _flash_attn_varlen_func()(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=dropout,
            softmax_scale=scale,
            causal=causal,
        )
    if q.is_cuda and backend == "torch_varlen":
        if dropout:
            raise ValueError(
                "torch_varlen attention has no dropout; set attention dropout to 0 or use 'flash'"
            )
        gqa = q.shape[1] != k.shape[1]
        if gqa and not _torch_varlen_has_gqa():
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = {"enable_gqa": gqa} if _torch_varlen_has_gqa() else {}
        return _torch_varlen_attn()(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale=scale,
            window_size=(-1, 0) if causal else (-1, -1),
            **extra,
        )
    # Per-segment SDPA: exact, any device. On CPU the boundaries are read without a device sync.
    bq = cu_seqlens_q.tolist()
    bk = bq if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.tolist()
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
    outs = []
    for i in range(len(bq) - 1):
        qs = qh[None, :, bq[i] : bq[i + 1]]  # [1, Hq, l, D]
        ks, vs = (x[None, :, bk[i] : bk[i + 1]] for x in (kh, vh))
        outs.append(_sdpa(qs, ks, vs, scale=scale, causal=causal, dropout=dropout)[0])
    return torch.cat(outs, dim=1).transpose(0, 1)  # [T, Hq, D]


def _cu_seqlens_from_positions(position_ids: Tensor) -> tuple[Tensor, int]:
    """Sequence boundaries of one packed row from its text positions (a new sequence starts wherever
    the position does not grow by exactly 1, as transformers' ``find_packed_sequence_indices``)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 2) != 1).flatten()
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def rlcs_attention_forward(
    module: nn.Module,
    query: Tensor,  # [B, Hq, Lq, D] (transformers' layout)
    key: Tensor,  # [B, Hkv, Lk, D]
    value: Tensor,  # [B, Hkv, Lk, D]
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The function behind ``ATTENTION_NAME`` → ([B, Lq, Hq, D], None).

    - Packed training (``cu_seq_lens_q`` given, batch 1): one varlen call, no mask, no device sync.
    - Packed without precomputed boundaries (batch 1, text ``position_ids`` that restart, no mask and
      no cache): boundaries are read from the positions (one sync per layer), as transformers' flash
      path does, so a packed batch never attends across sequences.
    - Otherwise (generation, padded batches): SDPA with the 2-D padding mask that
      ``flash_attention_mask`` passes through and a bottom-right causal mask for a KV cache.
    """
    if kwargs.get("sliding_window") is not None:
        raise ValueError("rlcs_varlen attention has no sliding window (Qwen2.5-VL does not use one)")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    backend = getattr(module, _BACKEND_ATTR, "sdpa_packed")
    b, _, lq, _ = query.shape
    lk = key.shape[2]

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is None and position_ids is not None and b == 1 and attention_mask is None and lq == lk:
        cu_q, max_q = _cu_seqlens_from_positions(position_ids)
        cu_k, max_k = cu_q, max_q
    if cu_q is not None:
        assert b == 1 and attention_mask is None, (
            f"packed attention takes one row and no mask, got query {tuple(query.shape)}, "
            f"mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
        cu_k = cu_q if cu_k is None else cu_k
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else max_q
        max_k = max_q if max_k is None else max_k
        out = varlen_attention(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu_q,
            cu_k,
            max_q,
            max_k,
            scale=scaling,
            causal=causal,
            backend=backend,
            dropout=dropout,
        )
        return out.unsqueeze(0), None
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"rlcs_varlen expects a 2-D padding mask or none, got {tuple(attention_mask.shape)}")
    out = _sdpa(query, key, value, scale=scaling, causal=causal, dropout=dropout, key_padding=attention_mask)
    return out.transpose(1, 2), None


def _vision_attention_forward(
    self: nn.Module,
    hidden_states: Tensor,  # [P, C] patches of all images, window-permuted
    cu_seqlens: Tensor,  # [W+1] int32: windows (or frames in full-attention blocks)
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` / ``Qwen3VLVisionAttention.forward`` (the same code) with one
    non-causal varlen call over ``cu_seqlens`` instead of transformers' per-window loop for non-"flash"
    implementations. The rotary is the one of the class's own modeling module."""
    apply_rotary_pos_emb_vision = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [P, H, D]
    if max_seqlen is None:  # not precomputed by the caller: one host read
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=self.scaling,
        causal=False,
        backend=getattr(self, _BACKEND_ATTR, "sdpa_packed"),
        dropout=self.attention_dropout if self.training else 0.0,
    )
    return self.proj(out.reshape(seq_length, -1))


@functools.cache
def register_attention() -> str:
    """Register ``ATTENTION_NAME`` with transformers (idempotent) and return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, rlcs_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME


def apply_attention(model: nn.Module, backend: str) -> str:
    """Make ``model`` (a built Qwen VL model, text and vision) use ``backend`` (from ``select_attention``)
    through ``ATTENTION_NAME``. Returns a name for the start log, e.g. ``"rlcs_varlen/flash"``."""
    from .families import family_for

    vision_attention = family_for(model.config).vision_attention_class()

    if backend not in BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} is not one of {BACKENDS}; resolve it with select_attention"
        )
    name = register_attention()
    model.set_attn_implementation(name)
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "scaling"):  # text and vision attention layers
            setattr(module, _BACKEND_ATTR, backend)
        if isinstance(module, vision_attention):
            module.forward = types.MethodType(_vision_attention_forward, module)
    return f"{name}/{backend}"
