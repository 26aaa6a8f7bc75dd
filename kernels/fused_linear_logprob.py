"""Fused lm_head + log-softmax + gather: per-token log-probs (and entropy) without ever holding [N, V] logits.

``logprob[n] = log_softmax(hidden[n] @ weight.T / temperature)[targets[n]]``; the SFT cross-entropy is the
mean of ``-logprob`` over loss tokens, GRPO's policy and reference log-probs are this op directly.

Kernels (Cut-Cross-Entropy style; every matmul is a bf16 ``tl.dot`` with a float32 accumulator):
- ``_stats_kernel`` (forward), grid (token blocks, vocabulary splits): each program computes logit tiles
  [BLOCK_N, BLOCK_V] of its vocabulary range with ``tl.dot`` over H, and folds them into an online softmax
  (running max, sum of exponentials, and sum of p·z for the entropy) plus the target logit. Only
  [splits, N] partials reach memory; torch merges them. Splitting the vocabulary keeps every SM busy at the
  small token counts of a GRPO micro-batch. With ``WITH_RAW`` (``raw_logprobs_out=``, a rollout temperature
  != 1) it folds each tile a second time, unscaled: the log-probs at T = 1 that engines report, for the
  price of one more exponential per logit instead of a second lm-head pass (2·N·H·V FLOPs).
- ``_dlogits_kernel`` (backward), grid (token blocks, vocabulary blocks) over one chunk of tokens:
  recomputes the logit tile (or, for the fused GRPO op, reads the tile stored by the forward) and writes
  dlogits = (g_lp·(onehot − p) − g_ent·p·(z − lse + H)) / temperature in the input dtype.
- ``_common._matmul_kernel``: dh[chunk] = dlogits @ W and dW += dlogitsᵀ @ h[chunk], GEMMs tiled over their
  outputs, so dW needs no atomics in the hot loop.

Memory: hidden-sized and weight-sized gradients, an fp32 dW accumulator, and one [chunk, V] dlogits buffer
(chunk chosen so that chunk·V ≈ 2^29 elements); never [N, V].
What it beats, and why (to be measured on an H100 by ``bench/``): eager torch materialises [N, V] fp32
logits, log_softmax and their gradient (≈ 3 passes over 4·N·V bytes, tens of GB at Qwen2.5-VL's 152k
vocabulary); Liger's fused-linear CE chunks tokens but runs the logits GEMM, a separate softmax kernel and
two more GEMMs through cuBLAS with an fp32 [chunk, V] round trip between each. Here the forward never
writes logits at all, and the backward writes only the 16-bit dlogits once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    INTERPRET_BLOCKS,
    autotuned,
    check_linear_inputs,
    compute_dtype,
    default_chunk_size,
    dlogits_dtype,
    dot_precision,
    launch,
    linear_backward_chunk,
    use_triton,
)

# Spill-free on sm_90a (HGMMA) and sm_80 at the JIT's specialisation (bench/aot_report.py sweeps them all).
# The forward's online-softmax epilogue (logit tile, its exponentials, p·z for the entropy) sits on top of
# the fp32 accumulator, so its tiles hold ≤ 64 accumulator registers per thread (128×128 or 64×256 on 8
# warps): 128×256 (128 per thread) spilled 300–650 B and 4-warp 128×128 (128 per thread) 290–820 B.
# The largest BLOCK_V here must divide triton_stats' split boundaries (256).
STATS_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
]
# With the raw (T = 1) log-sum-exp the epilogue folds each tile twice; 64 accumulator registers per thread
# then spill on sm_90a and sm_80 (128×128 on 8 warps: 56 B / 128 B with the fused op's entropy and stored
# logits; on 16 warps ptxas caps registers at 128 and spills too). 32 per thread fit with room to spare.
STATS_RAW_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
]
# The backward's epilogue is a single elementwise pass, lighter than the forward's: 4-warp tiles with 64
# accumulator registers per thread fit too (128×256 on 8 warps spilled 480 B on sm_80).
DLOGITS_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=4, num_stages=4),
]


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, BLOCK_V] float32 tile of hidden @ weight.T (unscaled)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_n64 = offs_n.to(tl.int64)
    offs_v64 = offs_v.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        a = tl.load(h_ptr + offs_n64[:, None] * stride_hn + offs_h[None, :],
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_ptr + offs_v64[:, None] * stride_wv + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _stats_kernel(
    h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, logits_ptr, m1_ptr, s1_ptr,
    N, V, H, v_per_split, inv_temp,
    stride_hn, stride_wv, stride_ln,
    STORE_LOGITS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    WITH_RAW: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m1_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s1_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
                        UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        if WITH_RAW:
            # The same logit tile at T = 1 folded into a second online softmax (m1, s1); zt then holds the
            # raw target logit (the pick is exact, so zt · inv_temp on the host is this tile's z bit for bit).
            zt_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
            z1_masked = tl.where(mask_v[None, :], z, float("-inf"))
            m1_new = tl.maximum(m1_i, tl.max(z1_masked, axis=1))
            s1_i = s1_i * tl.exp(m1_i - m1_new) + tl.sum(tl.exp(z1_masked - m1_new[:, None]), axis=1)
            m1_i = m1_new
        z = z * inv_temp
        if STORE_LOGITS:
            l_ptrs = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_ln + offs_v[None, :]
            tl.store(l_ptrs, z, mask=mask_n[:, None] & mask_v[None, :])
        if not WITH_RAW:
            zt_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        z_masked = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_masked, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z_masked - m_new[:, None])
        s_i = s_i * alpha + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            # p is 0 on padded columns; multiply the finite z there, never 0·(-inf).
            t_i = t_i * alpha + tl.sum(p * z, axis=1)
        m_i = m_new
    out = split * N + offs_n
    tl.store(m_ptr + out, m_i, mask=mask_n)
    tl.store(s_ptr + out, s_i, mask=mask_n)
    tl.store(zt_ptr + out, zt_i, mask=mask_n)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t_i, mask=mask_n)
    if WITH_RAW:
        tl.store(m1_ptr + out, m1_i, mask=mask_n)
        tl.store(s1_ptr + out, s1_i, mask=mask_n)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, logits_ptr, tgt_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, dl_ptr,
    N, V, H, inv_temp,
    stride_hn, stride_wv, stride_ln, stride_dn,
    RECOMPUTE: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    mask = mask_n[:, None] & mask_v[None, :]
    offs_n64 = offs_n.to(tl.int64)
    if RECOMPUTE:
        z = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
                        UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H) * inv_temp  # fmt: skip
    else:
        z = tl.load(logits_ptr + offs_n64[:, None] * stride_ln + offs_v[None, :], mask=mask, other=0.0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g_lp = tl.load(g_lp_ptr + offs_n, mask=mask_n, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = g_lp[:, None] * (tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs_n, mask=mask_n, other=0.0)
        # dH/dz_v = -p_v (log p_v + H), with log p_v = z_v - lse.
        dz -= g_ent[:, None] * p * (z - lse[:, None] + ent[:, None])
    dl = dz * inv_temp
    dl_ptrs = dl_ptr + offs_n64[:, None] * stride_dn + offs_v[None, :]
    tl.store(dl_ptrs, dl.to(dl_ptr.dtype.element_ty), mask=mask)


_stats_tuned = autotuned(_stats_kernel, STATS_CONFIGS, key=["H", "V", "STORE_LOGITS", "WITH_ENTROPY"])
_stats_raw_tuned = autotuned(_stats_kernel, STATS_RAW_CONFIGS, key=["H", "V", "STORE_LOGITS", "WITH_ENTROPY"])
_dlogits_tuned = autotuned(_dlogits_kernel, DLOGITS_CONFIGS, key=["H", "V", "RECOMPUTE", "WITH_ENTROPY"])
_BLOCKS = ("BLOCK_N", "BLOCK_V", "BLOCK_H")


# ---------------------------------------------------------------------------------------------- Triton path
def triton_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
    logits_out: torch.Tensor | None = None,
    raw_logprobs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse [N], target logit [N], entropy [N] or None), float32; fills ``logits_out`` [N, V] if given, and
    ``raw_logprobs_out`` [N] with the log-probs at T = 1 from the same pass over the vocabulary."""
    N, H = hidden.shape
    V = weight.shape[0]
    if INTERPRET:
        block_v = INTERPRET_BLOCKS["BLOCK_V"]
        splits = min(2, triton.cdiv(V, block_v))
    else:
        block_v = 256
        n_sm = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        splits = max(1, min(triton.cdiv(V, 2048), triton.cdiv(2 * n_sm, triton.cdiv(N, 128))))
    # Split boundaries on multiples of the largest BLOCK_V keep every tile but the last one full.
    v_per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, v_per_split)
    with_raw = raw_logprobs_out is not None
    part = torch.empty((6 if with_raw else 4, splits, N), device=hidden.device, dtype=torch.float32)
    m, s, t, zt = part[:4].unbind(0)
    m1, s1 = part[4:].unbind(0) if with_raw else (m, s)  # dummy pointers without the raw pass
    store = logits_out is not None
    logits = logits_out if store else part  # a dummy pointer when nothing is stored

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), splits)

    launch(
        _stats_kernel, _stats_raw_tuned if with_raw else _stats_tuned, grid,
        hidden, weight, targets, m, s, t, zt, logits, m1, s1,
        N, V, H, v_per_split, inv_temp,
        hidden.stride(0), weight.stride(0), logits.stride(0) if store else 0,
        names=_BLOCKS, STORE_LOGITS=store, WITH_ENTROPY=with_entropy, WITH_RAW=with_raw,
        UPCAST=INTERPRET, INPUT_PRECISION=dot_precision(hidden.dtype),
    )  # fmt: skip
    m_max = m.max(dim=0).values
    scale = torch.exp(m - m_max)
    sum_exp = (s * scale).sum(dim=0)
    lse = m_max + torch.log(sum_exp)
    entropy = lse - (t * scale).sum(dim=0) / sum_exp if with_entropy else None
    zt = zt.sum(dim=0)
    if with_raw:
        # zt is the raw target logit here; scaled as the kernel scales its tiles (the same float32 product)
        m1_max = m1.max(dim=0).values
        lse1 = m1_max + torch.log((s1 * torch.exp(m1 - m1_max)).sum(dim=0))
        raw_logprobs_out.copy_(zt - lse1)
        zt = zt * inv_temp
    return lse, zt, entropy


def triton_dlogits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
    out: torch.Tensor,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``out`` [n, V] with dL/d(raw logits) of a token chunk; logits recomputed unless given."""
    N, H = hidden.shape
    V = weight.shape[0]
    with_entropy = g_ent is not None
    recompute = logits is None
    src = out if recompute else logits

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))

    launch(
        _dlogits_kernel, _dlogits_tuned, grid,
        hidden, weight, src, targets, lse, entropy if with_entropy else lse, g_lp,
        g_ent if with_entropy else g_lp, out,
        N, V, H, inv_temp,
        hidden.stride(0), weight.stride(0), src.stride(0), out.stride(0),
        names=_BLOCKS, RECOMPUTE=recompute, WITH_ENTROPY=with_entropy,
        UPCAST=INTERPRET, INPUT_PRECISION=dot_precision(hidden.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- torch path
def _target_logit(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """z[n, targets[n]], 0 for a target outside [0, V)."""
    valid = (targets >= 0) & (targets < z.shape[1])
    return torch.where(valid, z.gather(1, targets.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)


def torch_stats_chunk(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    raw_logprobs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [n, V] (compute dtype), lse, target logit and entropy of one token chunk, in torch; fills
    ``raw_logprobs_out`` [n] with the log-probs at T = 1 of the same logits."""
    ct = compute_dtype(h.dtype)
    z = h.to(ct) @ weight.to(ct).t()
    if raw_logprobs_out is not None:
        raw_logprobs_out.copy_(_target_logit(z, targets) - torch.logsumexp(z, dim=-1))
    z = z * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    zt = _target_logit(z, targets)
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return z, lse, zt, entropy


def torch_dlogits(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
) -> torch.Tensor:
    p = torch.exp(z - lse[:, None])
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    dz = g_lp.to(z.dtype)[:, None] * (onehot.to(z.dtype) - p)
    if g_ent is not None:
        dz -= g_ent.to(z.dtype)[:, None] * p * (z - lse[:, None] + entropy[:, None])
    return dz * inv_temp


# ---------------------------------------------------------------------------------------- autograd Function
class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, via_triton, chunk_size, raw_out):
        inv_temp = 1.0 / temperature
        N = hidden.shape[0]
        if via_triton:
            lse, zt, entropy = triton_stats(hidden, weight, targets, inv_temp, with_entropy,
                                            raw_logprobs_out=raw_out)  # fmt: skip
        else:
            lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
            zt, entropy = torch.empty_like(lse), torch.empty_like(lse)
            for c0 in range(0, N, chunk_size):
                sl = slice(c0, c0 + chunk_size)
                raw_c = None if raw_out is None else raw_out[sl]
                _, lse_c, zt_c, ent_c = torch_stats_chunk(hidden[sl], weight, targets[sl], inv_temp,
                                                          raw_logprobs_out=raw_c)  # fmt: skip
                lse[sl], zt[sl], entropy[sl] = lse_c, zt_c, ent_c
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if with_entropy else None)
        ctx.inv_temp, ctx.via_triton, ctx.chunk_size = inv_temp, via_triton, chunk_size
        logprobs = zt - lse
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        V = weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if (g_ent is None or entropy is None) else g_ent.float().contiguous()
        dh = torch.empty_like(hidden) if need_dh else None
        # fp32 accumulator across chunks (fp64 for the fp64 reference): one rounding to the weight dtype.
        dw = None
        if need_dw:
            dw = torch.empty(weight.shape, device=weight.device, dtype=compute_dtype(weight.dtype))
        chunk = min(ctx.chunk_size, max(N, 1))
        dl_buf = None
        if ctx.via_triton:
            dl_buf = torch.empty((chunk, V), device=hidden.device, dtype=dlogits_dtype(hidden.dtype))
        for i, c0 in enumerate(range(0, N, chunk)):
            sl = slice(c0, c0 + chunk)
            h_c, t_c = hidden[sl], targets[sl]
            ge_c = g_ent[sl] if g_ent is not None else None
            if ctx.via_triton:
                ent_c = entropy[sl] if g_ent is not None else None
                dl = triton_dlogits(h_c, weight, t_c, lse[sl], ent_c, g_lp[sl], ge_c, ctx.inv_temp,
                                    dl_buf[: h_c.shape[0]])  # fmt: skip
            else:
                z, lse_c, _, ent_c = torch_stats_chunk(h_c, weight, t_c, ctx.inv_temp)
                dl = torch_dlogits(z, t_c, lse_c, ent_c, g_lp[sl], ge_c, ctx.inv_temp)
            linear_backward_chunk(dl, h_c, weight, dh[sl] if need_dh else None, dw, first=i == 0,
                                  via_triton=ctx.via_triton)  # fmt: skip
        if need_dw:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None, None


def check_raw_out(raw_logprobs_out: torch.Tensor | None, n_tokens: int) -> None:
    assert raw_logprobs_out is None or (raw_logprobs_out.shape == (n_tokens,)
                                        and raw_logprobs_out.dtype == torch.float32), (
        f"raw_logprobs_out {tuple(raw_logprobs_out.shape)} {raw_logprobs_out.dtype} must be float32 "
        f"[N={n_tokens}]")  # fmt: skip


def _run(hidden, weight, targets, temperature, with_entropy, via_triton, chunk_size, raw_logprobs_out=None):
    check_linear_inputs(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    check_raw_out(raw_logprobs_out, hidden.shape[0])
    if hidden.shape[0] == 0:
        # Keeps the graph connected so that callers may still call backward on an empty micro-batch.
        empty = hidden.float().sum(-1) + 0.0 * weight.float().sum()
        return (empty, empty.clone()) if with_entropy else empty
    if via_triton:
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    # At T = 1 the raw log-probs are the log-probs themselves: copied, no second softmax.
    raw_in_kernel = raw_logprobs_out if float(temperature) != 1.0 else None
    out = _FusedLinearLogprob.apply(
        hidden, weight, targets, float(temperature), with_entropy, via_triton, chunk, raw_in_kernel
    )  # fmt: skip
    if raw_logprobs_out is not None and raw_in_kernel is None:
        raw_logprobs_out.copy_((out[0] if with_entropy else out).detach())
    return out


def fused_linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    raw_logprobs_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch version of :func:`fused_linear_logprob`: token chunks, logits recomputed in backward.

    Math in float32 (float64 for float64 inputs); [chunk, V] at a time, never [N, V]. The CPU fallback.
    """
    return _run(hidden, weight, targets, temperature, with_entropy, False, chunk_size, raw_logprobs_out)


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
    raw_logprobs_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log_softmax(hidden @ weight.T / temperature)[targets]`` as float32 [N].

    hidden [N, H] and weight [V, H] (bf16/fp16/fp32, same dtype; weight may be the tied embedding), targets
    [N] int64. With ``with_entropy`` returns ``(logprobs, entropy)``, both float32 [N]. Differentiable in
    hidden and weight through both outputs. A target outside [0, V) gives ``-lse`` and no one-hot gradient
    (mask such tokens out of the loss). ``chunk_size``: tokens per backward chunk (default: chunk·V ≈ 2^29).
    ``impl``: "triton", "torch" (the chunked reference) or "auto" (Triton on CUDA or under the interpreter).
    ``raw_logprobs_out`` [N] float32, if given, receives the log-probs at T = 1 (no gradient), from the same
    pass over the vocabulary: a second log-sum-exp of the same logit tiles, not a second lm-head GEMM
    (what engines report are raw log-probs, so ``rollout/logprob_diff`` at T != 1 needs them).
    """
    via_triton = use_triton(impl, hidden, weight)
    return _run(hidden, weight, targets, temperature, with_entropy, via_triton, chunk_size, raw_logprobs_out)
