"""GRPO's advantage math: pure functions of the rewards, no model.

Responses arrive in consecutive groups of ``group_size`` (``grpo.n``) per prompt: rewards ``[B * G]``,
sample ``b * G + g`` is response ``g`` to prompt ``b``.

- :func:`group_advantages`: GRPO's outcome advantage as verl's ``compute_grpo_outcome_advantage``
  computes it, ``(r - mean_group) / (std_group + eps)`` with the unbiased std, or ``r - mean_group``
  (Dr. GRPO, ``std_norm=False``). Two deliberate differences, both where verl's numbers carry no
  signal: a group whose rewards are all equal gets exactly 0 (verl's float mean can differ from the
  rewards in the last bit, and dividing that by ``eps`` gives advantages of order 1e-2 out of nothing);
  a group of one gets 0 (verl uses mean 0 and std 1 there, i.e. the raw reward, which has no baseline).
- :func:`dynamic_sampling_mask`: DAPO's dynamic sampling filter, the groups worth training on.
- :func:`overlong_penalty`: DAPO's soft overlong punishment, added to the reward before advantages.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    assert isinstance(group_size, int) and group_size >= 1, (
        f"group_size must be an int >= 1, got {group_size!r}"
    )
    assert rewards.dim() == 1, f"rewards must be 1-D [B * G], got shape {tuple(rewards.shape)}"
    assert rewards.numel() % group_size == 0, (
        f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
    )
    return rewards.reshape(-1, group_size)  # [B, G]


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6, std_norm: bool = True) -> Tensor:
    """GRPO outcome advantages ``[B * G]`` from rewards ``[B * G]`` (consecutive groups per prompt).

    Computed in float64 and returned in the rewards' floating dtype (float32 for integer or bool
    rewards). Never NaN for finite rewards: groups without spread and groups of one give zeros.
    """
    grouped = _groups(rewards, group_size).to(torch.float64)  # [B, G]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if group_size == 1:
        return torch.zeros(rewards.shape, dtype=out_dtype, device=rewards.device)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_norm:
        centered = centered / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    has_spread = grouped.amax(dim=1, keepdim=True) != grouped.amin(dim=1, keepdim=True)  # [B, 1]
    return torch.where(has_spread, centered, 0.0).reshape(-1).to(out_dtype)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's online filter: ``[B]`` bool, True for prompts whose ``group_size`` rewards are not all equal.

    A group with equal rewards (all right, all wrong) has zero advantage and no policy gradient. Groups
    of one are always False here, unlike verl's DAPO which keeps them: with :func:`group_advantages`
    they carry no gradient either.
    """
    grouped = _groups(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def overlong_penalty(
    response_lengths: Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment for each response, a reward term ``<= 0`` (float32).

    0 while ``length <= max_len - buffer_len``, then linear down to ``-penalty_factor`` at ``max_len``:
    ``min(-(length - (max_len - buffer_len)) / buffer_len * penalty_factor, 0)`` as verl's DAPO reward
    manager writes it, clamped at ``-penalty_factor`` beyond ``max_len`` as in the DAPO paper (the
    rollout caps lengths at ``max_len``, so the clamp only guards against a misconfigured cap).
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    expected_len = max_len - buffer_len
    exceed_len = response_lengths.to(torch.float64) - expected_len
    penalty = (-exceed_len / buffer_len * penalty_factor).clamp(min=-penalty_factor, max=0.0)
    return penalty.to(torch.float32)
