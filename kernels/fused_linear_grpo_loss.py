"""Hidden states -> GRPO loss in one op: lm_head, log-softmax, clipped policy loss, KL, and both gradients.

The GRPO loss of a token depends on the model only through that token's log-prob, and its derivative
dL/dlogprob is known as soon as the log-prob is (``grpo_loss.token_weights`` fixes every aggregation as a
per-token weight up front). So the whole gradient is produced in the forward pass, per token chunk:

1. ``_stats_kernel`` computes the chunk's logits with ``tl.dot`` (bf16 in, fp32 accumulate), folds them into
   an online softmax and stores the fp32 logit tiles into a [chunk, V] buffer;
2. the ``grpo_loss`` kernel turns log-probs into dL/dlogprob, loss terms and statistics;
3. ``_dlogits_kernel`` reads the stored logits (no recompute) and writes 16-bit dlogits;
4. two output-tiled GEMMs produce dh[chunk] and accumulate dW (fp32, no atomics).

Backward only scales the stored dh and dW by the incoming gradient. Total matmul work is the 6·N·H·V
floor (logits, dh, dW: each 2·N·H·V); the fused-CE designs that recompute logits in backward pay 8·N·H·V.
Against Liger-Kernel's fused linear GRPO loss (chunked torch: a cuBLAS logits GEMM, an fp32
log_softmax over [chunk, V], torch.func gradients, and two more GEMMs) this saves the fp32 softmax
round trips and the autograd graph per chunk; speed and peak memory are to be measured in ``bench/`` at
N=16384, H=3584, V=151936 (target: within 1.5x of the 6·N·H·V floor, peak extra memory ≤ Liger's).
Its values and gradients equal ``grpo_loss(fused_linear_logprob(...), ...)``.

GSPO (``loss="gspo"``) needs each sequence's mean log-ratio before any token's gradient: off-policy, a
no-grad ``fused_linear_logprob`` pass over all tokens gives it first (8·N·H·V in all); on-policy
(``old_logprobs=None``) it is 0 and the single pass stands.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    check_linear_inputs,
    compute_dtype,
    default_chunk_size,
    dlogits_dtype,
    linear_backward_chunk,
    use_triton,
)
from .fused_linear_logprob import (
    check_raw_out,
    fused_linear_logprob,
    torch_dlogits,
    torch_stats_chunk,
    triton_dlogits,
    triton_stats,
)
from .grpo_loss import (
    STAT,
    GRPOOptions,
    finish_stats,
    reduce_partials,
    seq_log_ratio,
    token_weights,
    torch_stat_sums,
    torch_token_terms,
    triton_terms,
)


def _torch_terms(lp, old, adv, mask, w, ref, opts, slr=None):
    """(dloss/dlp, stat sums) of a chunk through autograd on verl's torch formulas."""
    lp = lp.detach().requires_grad_()
    with torch.enable_grad():
        ref = None if ref is None else ref.to(lp.dtype)
        terms = torch_token_terms(lp, old.to(lp.dtype), adv.to(lp.dtype), ref, opts, slr)
        valid = mask != 0
        loss = (torch.where(valid, terms["loss"], 0.0) * w).sum()
        (grad,) = torch.autograd.grad(loss, lp)
    return grad.float(), torch_stat_sums(terms, valid, w)


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, targets, old, adv, mask, ref, w, opts, inv_temp, with_entropy, via_triton, chunk,
        lp_out, raw_out, slr=None,
    ):  # fmt: skip
        N, V = hidden.shape[0], weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        # fp32 accumulator across chunks (fp64 for the fp64 reference): one rounding to the weight dtype.
        dw = None
        if need_dw:
            dw = torch.empty(weight.shape, device=weight.device, dtype=compute_dtype(weight.dtype))
        if via_triton:
            logits_buf = torch.empty((chunk, V), device=hidden.device, dtype=torch.float32)
            dl_buf = torch.empty((chunk, V), device=hidden.device, dtype=dlogits_dtype(hidden.dtype))
        sums, ent_sum = [], torch.zeros((), device=hidden.device, dtype=torch.float32)
        for i, c0 in enumerate(range(0, N, chunk)):
            sl = slice(c0, c0 + chunk)
            h_c, t_c, n_c = hidden[sl], targets[sl], min(chunk, N - c0)
            ref_c = None if ref is None else ref[sl]
            raw_c = None if raw_out is None else raw_out[sl]
            slr_c = None if slr is None else slr[sl]
            if via_triton:
                logits = logits_buf[:n_c]
                lse, zt, ent = triton_stats(h_c, weight, t_c, inv_temp, with_entropy, logits_out=logits,
                                            raw_logprobs_out=raw_c)  # fmt: skip
                lp = zt - lse
                g, s = triton_terms(lp, lp if old is None else old[sl], adv[sl], mask[sl], w[sl], ref_c, opts,
                                    slr_c)
                if need_dh or need_dw:
                    dl = triton_dlogits(h_c, weight, t_c, lse, None, g, None, inv_temp, dl_buf[:n_c],
                                        logits=logits)  # fmt: skip
            else:
                z, lse, zt, ent = torch_stats_chunk(h_c, weight, t_c, inv_temp, raw_logprobs_out=raw_c)
                # The same float32 log-prob the unfused op returns, so both paths agree bit for bit upstream.
                lp = (zt - lse).float().to(z.dtype)
                old_c = lp if old is None else old[sl]
                g, s = _torch_terms(lp, old_c, adv[sl], mask[sl], w[sl].to(z.dtype), ref_c, opts, slr_c)
                dl = torch_dlogits(z, t_c, lse, ent, g, None, inv_temp)
            if need_dh or need_dw:
                linear_backward_chunk(dl, h_c, weight, dh[sl] if need_dh else None, dw, first=i == 0,
                                      via_triton=via_triton)  # fmt: skip
            if lp_out is not None:
                lp_out[sl] = lp
            sums.append(s)
            if with_entropy:
                ent_sum = ent_sum + torch.where(mask[sl] != 0, ent.float(), 0.0).sum()
        total = reduce_partials(torch.stack(sums, dim=1))
        ent_mean = ent_sum / total[STAT["count"]].clamp(min=1.0)
        ctx.save_for_backward(dh, dw.to(weight.dtype) if need_dw else None)
        ctx.mark_non_differentiable(total, ent_mean)
        return total[STAT["loss"]].clone(), total, ent_mean

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_ent):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * g_loss.to(dh.dtype)
        dw = None if dw is None else dw * g_loss.to(dw.dtype)
        return (dh, dw) + (None,) * 14


def _gspo_seq_log_ratio(hidden, weight, targets, old_logprobs, mask, seq_ids, num_seqs, opts: GRPOOptions, *,
                        temperature: float, chunk: int, via_triton: bool) -> torch.Tensor | None:
    """GSPO's per-token log sequence ratio [N] (None for GRPO): zeros on-policy, else from a no-grad pass
    of the log-probs the fused forward will recompute (the same kernels, so the same values)."""
    if opts.loss != "gspo":
        return None
    if seq_ids is None:
        raise ValueError("loss='gspo' on packed [N] tokens needs seq_ids")
    if old_logprobs is None:
        return torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    with torch.no_grad():
        lp = fused_linear_logprob(hidden.detach(), weight.detach(), targets, temperature=temperature,
                                  chunk_size=chunk, impl="triton" if via_triton else "torch")
    return seq_log_ratio(lp, old_logprobs, mask, seq_ids=seq_ids, num_seqs=num_seqs)


def _fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    num_seqs: int | None,
    opts: GRPOOptions,
    *,
    temperature: float,
    with_entropy: bool,
    chunk_size: int | None,
    logprobs_out: torch.Tensor | None,
    via_triton: bool,
    raw_logprobs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    check_linear_inputs(hidden, weight, targets)
    N = hidden.shape[0]
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                    ("ref_logprobs", ref_logprobs), ("seq_ids", seq_ids),
                    ("logprobs_out", logprobs_out)):  # fmt: skip
        assert t is None or t.shape == (N,), f"{name} {tuple(t.shape)} must be packed [N={N}]"
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if N == 0:
        raise ValueError("fused_linear_grpo_loss got no tokens (hidden is [0, H])")
    assert logprobs_out is None or logprobs_out.dtype == torch.float32, f"logprobs_out: {logprobs_out.dtype}"
    check_raw_out(raw_logprobs_out, N)
    opts.validate(ref_logprobs is not None)
    w = token_weights(mask, opts.agg, norm_len=opts.norm_len, seq_ids=seq_ids, num_seqs=num_seqs).contiguous()

    def prep(t, dtype=torch.float32):
        return None if t is None else t.to(dtype).contiguous()

    chunk = min(chunk_size or default_chunk_size(N, weight.shape[0]), N)
    # At T = 1 the raw log-probs are the log-probs themselves: copied from logprobs_out, no second softmax.
    raw_in_kernel = raw_logprobs_out if float(temperature) != 1.0 else None
    if raw_logprobs_out is not None and raw_in_kernel is None and logprobs_out is None:
        logprobs_out = torch.empty_like(raw_logprobs_out)
    slr = _gspo_seq_log_ratio(hidden, weight, targets, old_logprobs, mask, seq_ids, num_seqs, opts,
                              temperature=temperature, chunk=chunk, via_triton=via_triton)
    if via_triton:
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    loss, sums, ent = _FusedLinearGRPOLoss.apply(
        hidden, weight, targets, prep(old_logprobs), prep(advantages), prep(mask, torch.uint8),
        prep(ref_logprobs), w, opts, 1.0 / float(temperature), with_entropy, via_triton, chunk, logprobs_out,
        raw_in_kernel, slr,
    )  # fmt: skip
    if raw_logprobs_out is not None and raw_in_kernel is None:
        raw_logprobs_out.copy_(logprobs_out)
    stats = finish_stats(sums)
    if with_entropy:
        stats["entropy"] = ent
    return loss, stats


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_dual: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    agg: str | None = None,
    norm_len: float | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
    logprobs_out: torch.Tensor | None = None,
    raw_logprobs_out: torch.Tensor | None = None,
    loss: str = "grpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss(fused_linear_logprob(hidden, weight, targets, temperature=...), ...)`` as one op.

    hidden [N, H] packed response states, weight [V, H] (lm_head, possibly tied), targets / old_logprobs /
    advantages / mask / ref_logprobs / seq_ids packed [N]. Options as in :func:`grpo_loss`. Returns the
    scalar loss (differentiable in hidden and weight) and the ``grpo_loss`` stats, plus ``entropy`` (mean
    over masked-in tokens, no gradient) when ``with_entropy``. ``chunk_size``: tokens per chunk (default:
    chunk·V ≈ 2^29); ``impl`` as in :func:`fused_linear_logprob` ("torch": token chunks, gradients formed in
    the forward, in pure torch). ``old_logprobs=None``: on-policy, the old log-probs are this forward's own
    (detached; ratio exactly 1), which saves the separate no-grad forward of the old policy.
    ``logprobs_out`` [N] float32, if given, receives the detached log-probs; ``raw_logprobs_out`` [N] float32
    the log-probs at T = 1 (engines report those), from a second log-sum-exp in the same pass over the
    vocabulary: no second lm-head GEMM.
    """
    via_triton = use_triton(impl, hidden, weight)
    opts = GRPOOptions.for_loss(loss, clip_low=clip_low, clip_high=clip_high, agg=agg, clip_dual=clip_dual,
                                kl_coef=kl_coef, kl_type=kl_type, norm_len=norm_len)  # fmt: skip
    return _fused_linear_grpo_loss(
        hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs, seq_ids, num_seqs, opts,
        temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size, logprobs_out=logprobs_out,
        via_triton=via_triton, raw_logprobs_out=raw_logprobs_out,
    )  # fmt: skip


def fused_linear_grpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fused_linear_grpo_loss` in pure torch on any device (the CPU fallback): the same keyword
    arguments, no ``impl``."""
    return fused_linear_grpo_loss(
        hidden, weight, targets, old_logprobs, advantages, mask, **options, impl="torch"
    )  # fmt: skip
