"""GRPO / PPO clipped policy loss with KL penalty and verl's loss aggregations, in one elementwise pass.

Semantics follow verl (``verl/trainer/ppo/core_algos.py``): ``compute_policy_loss_vanilla`` (log-ratio
clamped to [-20, 20], asymmetric clip ``[1 - clip_low, 1 + clip_high]``, dual clip ``clip_dual`` on negative
advantages only), ``kl_penalty`` (``kl``, ``abs``, ``mse``, ``low_var_kl`` clamped to [-10, 10]) added per
token as ``kl_coef * kl`` before aggregation (verl's ``use_kl_loss``), and ``agg_loss`` (``token_mean``,
``seq_mean_token_mean``, ``seq_mean_token_sum``, ``seq_mean_token_sum_norm``). One deliberate difference: a
sequence whose tokens are all masked contributes 0 under ``seq_mean_token_mean`` (verl divides 0 by 0).

Every aggregation is linear in the per-token losses, so it reduces to a per-token weight computed once in
torch from the mask (``token_weights``). One Triton kernel then produces, per token, the loss term, its
gradient w.r.t. the log-prob, and per-program partial statistics (no atomics, deterministic); backward is
a scale of the stored gradient. Eager torch needs ~25 elementwise kernels and their autograd graph for
the same result; this is one read of the inputs and one write of the gradient (speed-up to be measured
in ``bench/``). The same per-token pass drives the fused hidden-states-to-loss op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, INTERPRET_BLOCKS, use_triton

AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
LOSSES = ("grpo", "gspo")
# The defaults per loss: verl's clip ratios (GSPO: 3e-4 / 4e-4, the paper's) and aggregations (GSPO
# aggregates seq-mean-token-mean, as verl's compute_policy_loss_gspo forces)
LOSS_DEFAULTS = {"grpo": {"clip_low": 0.2, "clip_high": 0.2, "agg": "token_mean"},
                 "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq_mean_token_mean"}}
# verl clamps GSPO's sequence log-ratio from above only, at 10
GSPO_LOG_RATIO_MAX = 10.0
KL_TYPES = ("kl", "abs", "mse", "low_var_kl")
# Per-token statistics, summed over valid tokens (ratio_min / ratio_max: extremes), in the row order of the
# kernel's partials; STAT maps a name to its row.
STAT_NAMES = (
    "loss", "clip_frac", "clip_frac_lower", "kl", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max", "count",
)  # fmt: skip
STAT = {name: row for row, name in enumerate(STAT_NAMES)}


@dataclass(frozen=True)
class GRPOOptions:
    """The scalar options of :func:`grpo_loss`, as its keyword arguments of the same names."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_dual: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    agg: str = "token_mean"
    norm_len: float | None = None
    loss: str = "grpo"

    @classmethod
    def for_loss(cls, loss: str, *, clip_low: float | None, clip_high: float | None, agg: str | None,
                 **options: Any) -> GRPOOptions:
        """Options with ``None`` clip ratios / aggregation resolved to ``loss``'s defaults."""
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
        d = LOSS_DEFAULTS[loss]
        return cls(clip_low=d["clip_low"] if clip_low is None else clip_low,
                   clip_high=d["clip_high"] if clip_high is None else clip_high,
                   agg=d["agg"] if agg is None else agg, loss=loss, **options)

    def validate(self, has_ref: bool) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {LOSSES}")
        if self.loss == "gspo" and self.clip_dual is not None:
            raise ValueError("clip_dual is a token-level GRPO option: verl's GSPO has no dual clip")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type={self.kl_type!r}: expected one of {KL_TYPES}")
        if self.clip_dual is not None and self.clip_dual <= 1.0:
            raise ValueError(
                f"clip_dual={self.clip_dual} must be > 1 (verl's clip_ratio_c), or None to disable"
            )
        if self.kl_coef != 0.0 and not has_ref:
            raise ValueError(f"kl_coef={self.kl_coef} needs ref_logprobs")


# ------------------------------------------------------------------------------------------------- weights
def token_weights(
    mask: torch.Tensor,
    agg: str,
    *,
    norm_len: float | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Float32 weight of each token's loss in the aggregated loss (zero on masked tokens)."""
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r}: expected one of {AGGS}")
    m = mask.to(torch.float32)
    if agg == "token_mean":
        return m / m.sum().clamp(min=1.0)
    if agg == "seq_mean_token_sum_norm":
        if norm_len is None:
            if m.dim() != 2:
                raise ValueError(
                    "agg='seq_mean_token_sum_norm' on packed [N] tokens needs norm_len (sequences x horizon)"
                )
            # B·T, the batch's sequences times the padded horizon, as verl 0.9, Dr. GRPO (TRL's
            # "dr_grpo") and Liger divide: by T alone the loss would grow with the batch size
            norm_len = m.shape[0] * m.shape[-1]
        return m / float(norm_len)
    if m.dim() == 2:
        n_seq = m.shape[0]
        if agg == "seq_mean_token_sum":
            return m / n_seq
        return m / (n_seq * m.sum(-1, keepdim=True).clamp(min=1.0))
    if seq_ids is None:
        raise ValueError(f"agg={agg!r} on packed [N] tokens needs seq_ids")
    assert seq_ids.shape == m.shape, f"seq_ids {tuple(seq_ids.shape)} vs mask {tuple(m.shape)}"
    n_seq = int(seq_ids.max().item()) + 1 if num_seqs is None else num_seqs
    if agg == "seq_mean_token_sum":
        return m / n_seq
    counts = torch.zeros(n_seq, device=m.device, dtype=torch.float32).index_add_(0, seq_ids.long(), m)
    return m / (n_seq * counts.clamp(min=1.0)[seq_ids.long()])


def seq_log_ratio(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """GSPO's log sequence ratio, per token (detached): the mean over the token's sequence of
    ``logprobs - old_logprobs`` on masked-in tokens (0 for a sequence without any), as verl's
    ``compute_policy_loss_gspo``. [B, T] rows are sequences; packed [N] needs ``seq_ids``."""
    ct = torch.promote_types(torch.promote_types(logprobs.dtype, old_logprobs.dtype), torch.float32)
    diff = torch.where(mask != 0, logprobs.detach().to(ct) - old_logprobs.to(ct), 0.0)
    m = (mask != 0).to(diff.dtype)
    if diff.dim() == 2:
        return (diff.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(diff)
    if seq_ids is None:
        raise ValueError("loss='gspo' on packed [N] tokens needs seq_ids")
    ids = seq_ids.long()
    n_seq = int(ids.max().item()) + 1 if num_seqs is None else num_seqs
    sums = torch.zeros(n_seq, device=diff.device, dtype=diff.dtype).index_add_(0, ids, diff)
    counts = torch.zeros(n_seq, device=diff.device, dtype=diff.dtype).index_add_(0, ids, m)
    return (sums / counts.clamp(min=1.0))[ids]


# -------------------------------------------------------------------------------------------------- kernel
# Memory-bound and tiny next to the lm_head GEMMs: one fixed config, no autotuning (which would also make
# the number of per-program partials depend on the chosen block).
GRPO_BLOCK_T, GRPO_NUM_WARPS = 1024, 4


@triton.jit
def _grpo_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, w_ptr, ref_ptr, grad_ptr, part_ptr, slr_ptr,
    N, num_programs, clip_low, clip_high, clip_dual, kl_coef,
    HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr, BLOCK_T: tl.constexpr,
    GSPO: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_n = offs < N
    valid = in_n & (tl.load(mask_ptr + offs, mask=in_n, other=0) != 0)
    lp = tl.load(lp_ptr + offs, mask=in_n, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=in_n, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=in_n, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=in_n, other=0.0)

    log_ratio = lp - old
    if GSPO:
        # s_t = sg[s] · exp(lp - sg[lp]): the value is the sequence ratio, d s_t / d lp = s_t
        slr = tl.load(slr_ptr + offs, mask=in_n, other=0.0).to(tl.float32)
        log_ratio_c = tl.minimum(slr, 10.0)
        in_range = slr <= 10.0
        neg_kl = -log_ratio
    else:
        log_ratio_c = tl.minimum(tl.maximum(log_ratio, -20.0), 20.0)
        in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        neg_kl = -log_ratio_c
    ratio = tl.exp(log_ratio_c)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    # d pg / d lp: the clipped branch is constant in lp; the unclipped one is -A·ratio.
    dpg = tl.where(clipped, 0.0, -adv * ratio)
    dual = tl.zeros((BLOCK_T,), dtype=tl.int1)
    if DUAL_CLIP:
        pg3 = -adv * clip_dual
        dual = (adv < 0) & (pg > pg3)
        pg = tl.where(dual, pg3, pg)
        dpg = tl.where(dual, 0.0, dpg)
    dpg = tl.where(in_range, dpg, 0.0)

    kl = tl.zeros_like(lp)
    dkl = tl.zeros_like(lp)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=in_n, other=0.0).to(tl.float32)
        diff = lp - ref
        if KL_TYPE == 0:
            kl = diff
            dkl = tl.full(diff.shape, 1.0, tl.float32)
        elif KL_TYPE == 1:
            kl = tl.abs(diff)
            dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        elif KL_TYPE == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        else:
            k = -diff
            k_c = tl.minimum(tl.maximum(k, -20.0), 20.0)
            r = tl.exp(k_c)
            kld = r - k_c - 1.0
            kl = tl.minimum(tl.maximum(kld, -10.0), 10.0)
            keep = (k >= -20.0) & (k <= 20.0) & (kld >= -10.0) & (kld <= 10.0)
            dkl = tl.where(keep, 1.0 - r, 0.0)

    loss_tok = pg + kl_coef * kl
    tl.store(grad_ptr + offs, tl.where(valid, w * (dpg + kl_coef * dkl), 0.0), mask=in_n)

    # One row per statistic, in STAT_NAMES order.
    vf = valid.to(tl.float32)
    part = part_ptr + pid
    tl.store(part + 0 * num_programs, tl.sum(tl.where(valid, w * loss_tok, 0.0), axis=0))
    tl.store(part + 1 * num_programs, tl.sum(tl.where(valid & clipped, 1.0, 0.0), axis=0))
    tl.store(part + 2 * num_programs, tl.sum(tl.where(valid & dual, 1.0, 0.0), axis=0))
    tl.store(part + 3 * num_programs, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(part + 4 * num_programs, tl.sum(tl.where(valid, neg_kl, 0.0), axis=0))
    tl.store(part + 5 * num_programs, tl.sum(tl.where(valid, ratio, 0.0), axis=0))
    tl.store(part + 6 * num_programs, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(part + 7 * num_programs, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))
    tl.store(part + 8 * num_programs, tl.sum(vf, axis=0))


def reduce_partials(part: torch.Tensor) -> torch.Tensor:
    """[NSTAT, P] per-program (or per-chunk) partials -> [NSTAT] totals: sums, min / max for the extremes."""
    out = part.sum(dim=1)
    out[STAT["ratio_min"]] = part[STAT["ratio_min"]].min()
    out[STAT["ratio_max"]] = part[STAT["ratio_max"]].max()
    return out


def triton_terms(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    w: torch.Tensor,
    ref: torch.Tensor | None,
    opts: GRPOOptions,
    slr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat [n] inputs -> (dloss/dlp [n] float32, stat sums [NSTAT]) with the Triton kernel. ``slr``:
    GSPO's per-token log sequence ratio (:func:`seq_log_ratio`), with ``opts.loss == "gspo"``."""
    gspo = opts.loss == "gspo"
    assert not gspo or (slr is not None and slr.numel() == lp.numel()), "loss='gspo' needs slr [n]"
    n = lp.numel()
    block = INTERPRET_BLOCKS["BLOCK_T"] if INTERPRET else GRPO_BLOCK_T
    num_programs = max(1, triton.cdiv(n, block))
    grad = torch.empty(n, device=lp.device, dtype=torch.float32)
    part = torch.empty((len(STAT_NAMES), num_programs), device=lp.device, dtype=torch.float32)
    _grpo_kernel[(num_programs,)](
        lp, old, adv, mask, w, ref if ref is not None else lp, grad, part, slr if gspo else lp,
        n, num_programs, opts.clip_low, opts.clip_high,
        opts.clip_dual if opts.clip_dual is not None else 0.0, opts.kl_coef,
        HAS_REF=ref is not None, DUAL_CLIP=opts.clip_dual is not None,
        KL_TYPE=KL_TYPES.index(opts.kl_type), BLOCK_T=block, num_warps=GRPO_NUM_WARPS, GSPO=gspo,
    )  # fmt: skip
    return grad, reduce_partials(part)


# ---------------------------------------------------------------------------------------------- torch math
def torch_token_terms(
    lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor | None, opts: GRPOOptions,
    slr: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token loss (differentiable in lp) and the per-token quantities behind the stats, verl's way
    (``slr``: GSPO's log sequence ratio per token, with ``opts.loss == "gspo"``)."""
    if opts.loss == "gspo":  # verl's compute_policy_loss_gspo: sg[log s] + lp - sg[lp], clamped above
        log_ratio = torch.clamp(lp - lp.detach() + slr.to(lp.dtype), max=GSPO_LOG_RATIO_MAX)
        neg_log_ratio = old - lp
    else:
        log_ratio = torch.clamp(lp - old, min=-20.0, max=20.0)
        neg_log_ratio = -log_ratio
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - opts.clip_low, 1.0 + opts.clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if opts.clip_dual is not None:
        pg3 = -adv * opts.clip_dual
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg3, pg), pg)
    kl = torch.zeros_like(pg)
    if ref is not None:
        if opts.kl_type == "kl":
            kl = lp - ref
        elif opts.kl_type == "abs":
            kl = (lp - ref).abs()
        elif opts.kl_type == "mse":
            kl = 0.5 * (lp - ref).square()
        else:
            k = torch.clamp(ref - lp, min=-20.0, max=20.0)
            kl = torch.clamp(torch.exp(k) - k - 1.0, min=-10.0, max=10.0)
    return {
        "loss": pg + opts.kl_coef * kl,
        "clipped": (pg2 > pg1).float(),
        "dual": dual.float(),
        "kl": kl,
        "neg_log_ratio": neg_log_ratio,
        "ratio": ratio,
    }


def torch_stat_sums(terms: dict[str, torch.Tensor], valid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel's statistic totals [NSTAT] (float32, STAT_NAMES order) from :func:`torch_token_terms`."""
    v = valid.to(terms["ratio"].dtype)
    ratio = terms["ratio"].detach()
    inf = torch.tensor(float("inf"), device=ratio.device, dtype=ratio.dtype)
    sums = {
        "loss": (w * terms["loss"].detach() * v).sum(),
        "clip_frac": (terms["clipped"] * v).sum(),
        "clip_frac_lower": (terms["dual"] * v).sum(),
        "kl": (terms["kl"].detach() * v).sum(),
        "ppo_kl": (terms["neg_log_ratio"].detach() * v).sum(),
        "ratio_mean": (ratio * v).sum(),
        "ratio_min": torch.where(valid, ratio, inf).min() if ratio.numel() else inf,
        "ratio_max": torch.where(valid, ratio, -inf).max() if ratio.numel() else -inf,
        "count": v.sum(),
    }
    return torch.stack([sums[name] for name in STAT_NAMES]).float()


def finish_stats(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stat totals [NSTAT] -> dict of scalar means over valid tokens (all zero when no token is valid)."""
    total = dict(zip(STAT_NAMES, sums.unbind(0)))
    denom = total["count"].clamp(min=1.0)
    has = total["count"] > 0
    zero = torch.zeros((), device=sums.device)
    return {
        "clip_frac": total["clip_frac"] / denom,
        "clip_frac_lower": total["clip_frac_lower"] / denom,
        "kl": total["kl"] / denom,
        "ppo_kl": total["ppo_kl"] / denom,
        "ratio_mean": total["ratio_mean"] / denom,
        "ratio_min": torch.where(has, total["ratio_min"], zero),
        "ratio_max": torch.where(has, total["ratio_max"], zero),
    }


# -------------------------------------------------------------------------------------- autograd Function
class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old, adv, mask, ref, w, opts, slr=None):
        grad, sums = triton_terms(logprobs.reshape(-1).contiguous(), old, adv, mask, w, ref, opts, slr)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = logprobs.shape, logprobs.dtype
        ctx.mark_non_differentiable(sums)
        return sums[STAT["loss"]].clone(), sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None, None, None


def on_policy_old(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None) -> torch.Tensor:
    """``old_logprobs``, or on-policy (None) the detached ``logprobs`` themselves: log-ratio exactly 0."""
    return logprobs.detach() if old_logprobs is None else old_logprobs


def _grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    num_seqs: int | None,
    opts: GRPOOptions,
    via_triton: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                    ("ref_logprobs", ref_logprobs)):  # fmt: skip
        assert t is None or t.shape == logprobs.shape, (
            f"{name} {tuple(t.shape)} vs logprobs {tuple(logprobs.shape)}"
        )
    assert logprobs.dim() in (1, 2), f"logprobs must be [B, T] or packed [N], got {tuple(logprobs.shape)}"
    opts.validate(ref_logprobs is not None)
    w = token_weights(mask, opts.agg, norm_len=opts.norm_len, seq_ids=seq_ids, num_seqs=num_seqs)
    old_logprobs = on_policy_old(logprobs, old_logprobs)
    slr = None
    if opts.loss == "gspo":
        slr = seq_log_ratio(logprobs, old_logprobs, mask, seq_ids=seq_ids, num_seqs=num_seqs)
    if via_triton:

        def flat(t):
            return None if t is None else t.reshape(-1).contiguous()

        loss, sums = _GRPOLoss.apply(
            logprobs, flat(old_logprobs), flat(advantages), flat(mask.to(torch.uint8)), flat(ref_logprobs),
            flat(w), opts, flat(slr),
        )  # fmt: skip
        return loss, finish_stats(sums)
    ct = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    terms = torch_token_terms(
        logprobs.to(ct), old_logprobs.to(ct), advantages.to(ct),
        None if ref_logprobs is None else ref_logprobs.to(ct), opts, slr,
    )  # fmt: skip
    valid = mask != 0
    loss = (torch.where(valid, terms["loss"], 0.0) * w.to(ct)).sum()
    return loss, finish_stats(torch_stat_sums(terms, valid, w.to(ct)))


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_dual: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    agg: str | None = None,
    norm_len: float | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    impl: str = "auto",
    loss: str = "grpo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's clipped GRPO policy loss (+ ``kl_coef`` · KL to the reference), aggregated by ``agg``.

    Per-token tensors share one shape: [B, T] (a row per sequence) or packed [N] with ``seq_ids`` [N]
    (sequence index 0..S-1 of each token; ``num_seqs`` = S avoids a device sync when given). Returns the
    scalar float32 loss (differentiable in ``logprobs`` only) and scalar stats over masked-in tokens:
    ``clip_frac``, ``clip_frac_lower`` (dual clip), ``kl`` (to the reference, 0 without one), ``ppo_kl``
    (to the old policy), ``ratio_mean``, ``ratio_min``, ``ratio_max``. ``old_logprobs=None``: on-policy
    (one update per rollout batch, as TRL and nanochat do): the old log-probs are the detached ``logprobs``,
    the ratio is exactly 1 and the gradient that of the unclipped surrogate. ``impl``: "triton", "torch"
    (verl's formulas through autograd) or "auto" (Triton on CUDA or under the interpreter).

    ``loss="gspo"``: verl's ``compute_policy_loss_gspo``. The ratio is the sequence's,
    ``s = exp(mean over the sequence's masked-in tokens of (logprobs - old))``, clamped above at
    exp(10); each token's term is clipped as GRPO's with ``sg[s] · exp(logp - sg[logp])`` in place of the
    token ratio, so the gradient reaches every token (``ratio_*`` stats are of ``s``). ``None`` options
    take the loss's defaults: clips 0.2 / 0.2 and ``token_mean`` (grpo), 3e-4 / 4e-4 and
    ``seq_mean_token_mean`` (gspo, as verl). GSPO has no ``clip_dual``.
    """
    via_triton = use_triton(impl, logprobs, advantages, mask)
    opts = GRPOOptions.for_loss(loss, clip_low=clip_low, clip_high=clip_high, agg=agg, clip_dual=clip_dual,
                                kl_coef=kl_coef, kl_type=kl_type, norm_len=norm_len)  # fmt: skip
    return _grpo_loss(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, seq_ids, num_seqs, opts, via_triton
    )  # fmt: skip


def grpo_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`grpo_loss` in pure torch on any device (the CPU fallback): the same keyword arguments, no
    ``impl``."""
    return grpo_loss(logprobs, old_logprobs, advantages, mask, **options, impl="torch")
