"""Rollout correction: the engine samples from a policy that is not quite the trainer's.

The engine (vLLM, bf16, its own kernels) and the trainer recompute the same tokens' log-probs with other
kernels and precisions; the gap grows over a run (Yao et al., "Your efficient RL framework secretly brings
you off-policy RL training"). :func:`weights` turns the two log-probs of each response token into

- per-token importance weights, TRL's ``vllm_importance_sampling_mode`` semantics (``GRPOTrainer``:
  ratio ``exp(old - rollout)``, per token or per sequence with the row's SUM of log-ratios, truncated to
  ``[C_min, C_max]`` or zeroed outside it);
- a rejection mask, verl's ``rollout_rs`` / ``rollout_rs_threshold`` (``rollout_corr_helper.py``:
  comma-chained divergence criteria that must all pass, k1 bounds as ``lower_upper`` ratios);
- verl's ``rollout_corr/*`` mismatch metrics (KL by the k1 and k3 estimators, the raw ratio's range and
  the fractions masked).

Pure tensor math, no model: the trainer calls it once per step (:func:`correct_rollouts`) after the old
policy's log-probs are known, and multiplies each token's policy-gradient term by its weight.
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# verl's SUPPORTED_ROLLOUT_RS_OPTIONS
REJECTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
# verl clamps the log-ratio to ±20 before its divergence statistics (exp(20) ≈ 5e8)
SAFETY_BOUND = 20.0
METRIC_KEYS = tuple(f"rollout_corr/{k}" for k in ("kl_k1", "kl_k3", "ratio_mean", "ratio_max", "ratio_min",
                                                    "masked_token_fraction", "masked_seq_fraction"))


def parse_rejection(rejection: str, threshold: str | float | None) -> list[tuple[str, float | None, float]]:
    """verl's ``rollout_rs`` + ``rollout_rs_threshold`` → ``[(option, lower, upper)]``, deduplicated in
    order. Thresholds: one shared by all options or one per option, comma-separated; a k1 option takes
    ``"lower_upper"`` ratio bounds (a single value ``u`` means ``1/u .. u``), the others one upper bound."""
    options = []
    for opt in (o.strip() for o in rejection.split(",")):
        if not opt:
            continue
        if opt not in REJECTIONS:
            raise ValueError(f"rejection option {opt!r} is not one of {REJECTIONS}")
        if opt not in options:
            options.append(opt)
    if not options:
        raise ValueError(f"rejection={rejection!r} names no option: use one of {REJECTIONS}")
    if threshold is None or threshold == "":
        raise ValueError(f"rejection={rejection!r} needs rejection_threshold (verl's rollout_rs_threshold)")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        specs = [str(threshold)]
    elif isinstance(threshold, str):
        specs = [s.strip() for s in threshold.split(",") if s.strip()]
    else:
        raise ValueError(f"rejection_threshold={threshold!r} must be a number or a string")
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rejection_threshold={threshold!r}: give one threshold for all {len(options)} "
                         "options or one per option")
    specs = specs * len(options) if len(specs) == 1 else specs
    out = []
    for opt, spec in zip(options, specs):
        try:
            if opt.endswith("k1"):
                lower_s, upper_s = spec.split("_", 1) if "_" in spec else (None, spec)
                upper = float(upper_s)
                lower = float(lower_s) if lower_s is not None else 1.0 / upper
                if lower <= 0 or upper <= 0:
                    raise ValueError
            else:  # one upper bound ("0.5_2" would read as 0.52 in Python's float)
                upper, lower = float(spec), None
                if upper <= 0 or "_" in spec:
                    raise ValueError
        except (ValueError, ZeroDivisionError):
            form = '"lower_upper" ratios or one ratio > 0' if opt.endswith("k1") else "one number > 0"
            raise ValueError(f"rejection_threshold {spec!r} for {opt!r} must be {form}") from None
        out.append((opt, lower, upper))
    return out


def _rejection_keep(log_ratio: torch.Tensor, mask: torch.Tensor,
                    criteria: list[tuple[str, float | None, float]]) -> torch.Tensor:
    """[B, T] bool: tokens that pass every criterion (verl's ``compute_rollout_rejection_mask``).
    log_ratio = old - rollout, 0 where ``mask`` is False."""
    if mask.shape[-1] == 0:
        return mask.clone()
    lr = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    # verl's per-token statistics; k1 is -log_ratio = rollout - old (its sign, kept)
    stats = {"k1": -lr, "k2": 0.5 * lr.square(), "k3": torch.exp(lr) - 1.0 - lr}
    count = mask.sum(-1)
    keep = torch.ones_like(mask)
    for opt, lower, upper in criteria:
        level, k = opt.rsplit("_", 1)
        stat = stats[k]
        if level == "seq_sum":
            stat = torch.where(mask, stat, 0.0).sum(-1, keepdim=True)
        elif level == "seq_mean":  # verl_F.masked_mean: sum / (count + 1e-8)
            stat = torch.where(mask, stat, 0.0).sum(-1, keepdim=True) / (count.unsqueeze(-1) + 1e-8)
        elif level == "seq_max":  # an empty row's max is 0
            stat = torch.where(mask, stat, -math.inf).amax(-1, keepdim=True)
            stat = torch.where(stat == -math.inf, 0.0, stat)
        if k == "k1":
            ok = (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            ok = stat <= upper
        keep = keep & ok.expand_as(mask)
    return keep


def weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *, mode: str,
            clip_min: float | None, clip_max: float | None, rejection: str | None = None,
            rejection_threshold: str | float | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Importance weights, rejection mask and mismatch metrics of the rollout policy vs the trainer's.

    ``old_logprobs`` (the trainer's old policy), ``rollout_logprobs`` (the engine's) [B, T] float, ``mask``
    [B, T] bool (response tokens; holes, empty rows allowed; values under False are ignored). Returns

    - ``weights`` [B, T] float32, finite: the per-token factor of the policy-gradient term. ``mode``
      "none": 1; otherwise TRL's ``vllm_importance_sampling_mode``: the ratio ``exp(old - rollout)`` per
      token (``token_*``) or ``exp(sum over the row)`` broadcast over the row (``sequence_*``), clamped
      to ``[clip_min, clip_max]`` (``*_truncate``) or set to 0 outside it (``*_mask``; the token stays in
      the mask and in the loss normaliser). ``None`` bounds are open. Under the mask's False the value is
      TRL's (the log-ratio taken as 0 there).
    - ``mask`` [B, T] bool: the input mask less the tokens ``rejection`` drops (verl's ``rollout_rs``
      criteria, comma-chained, all must pass; ``rejection_threshold`` as verl's ``rollout_rs_threshold``).
      The weights ignore rejection (verl computes IS before rejection).
    - ``metrics``: ``rollout_corr/kl_k1`` (mean of rollout - old), ``kl_k3`` (mean of exp(d) - d - 1,
      d = old - rollout), ``ratio_mean|max|min`` (the raw token ratio), over the input mask's tokens;
      ``masked_token_fraction`` (of those tokens, rejected or zeroed by a mask mode) and
      ``masked_seq_fraction`` (rows holding such a token, over all rows). 0.0 when there is no token.
    """
    if mode not in MODES:
        raise ValueError(f"rollout correction mode={mode!r}: expected one of {MODES}")
    criteria = parse_rejection(rejection, rejection_threshold) if rejection else None
    assert old_logprobs.shape == rollout_logprobs.shape == mask.shape and mask.dim() == 2, (
        f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} and "
        f"mask {tuple(mask.shape)} must share one [B, T] shape")
    mask = mask.bool()
    # [B, T] float64 log-ratio of the trainer over the engine, 0 off the mask (nothing there leaks)
    d = torch.where(mask, old_logprobs.double() - rollout_logprobs.double(), 0.0)

    masked = torch.zeros_like(mask)  # tokens a mask mode zeroes
    if mode == "none":
        w = torch.ones_like(d)
    else:
        per_row = mode.startswith("sequence")
        ratio = torch.exp(d.sum(-1, keepdim=True)).expand_as(d) if per_row else torch.exp(d)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        if mode.endswith("truncate"):
            w = ratio.clamp(min=lo, max=hi)
        else:
            outside = (ratio < lo) | (ratio > hi)
            w = ratio.masked_fill(outside, 0.0)
            masked = outside & mask
    fmax = torch.finfo(torch.float32).max
    w = torch.nan_to_num(w, nan=0.0, posinf=fmax).clamp(max=fmax).float()

    keep = _rejection_keep(d, mask, criteria) & mask if criteria else mask.clone()
    dropped = masked | (mask & ~keep)
    return w, keep, _metrics(d, mask, dropped)


def _metrics(d: torch.Tensor, mask: torch.Tensor, dropped: torch.Tensor) -> dict[str, float]:
    n = int(mask.sum())
    out = dict.fromkeys(METRIC_KEYS, 0.0)
    if mask.shape[0]:
        out["rollout_corr/masked_seq_fraction"] = float(dropped.any(-1).double().mean())
    if n == 0:
        return out
    x = d[mask]  # [n] old - rollout of the response tokens
    ratio = torch.exp(x)
    out.update({
        "rollout_corr/kl_k1": float((-x).mean()),
        "rollout_corr/kl_k3": float((ratio - x - 1.0).mean()),
        "rollout_corr/ratio_mean": float(ratio.mean()),
        "rollout_corr/ratio_max": float(ratio.max()),
        "rollout_corr/ratio_min": float(ratio.min()),
        "rollout_corr/masked_token_fraction": float(dropped.sum()) / n,
    })
    return out
