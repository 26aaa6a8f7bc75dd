"""Which sample runs where, with which image: a step's samples into ranks and micro-batches.

Three decisions, each a pure function of host-side numbers (lengths, group ids), so every rank computes
the same answer from the same inputs and the collectives line up:
- ``rank_share``: a rank's strided share of a global batch (data loading, validation).
- ``balance_groups``: after generation, move whole groups (a prompt's responses, which share its image)
  between data-parallel ranks so that every rank holds about as many tokens (Karmarkar-Karp, as verl,
  OpenRLHF and AReaL do), keeping as many groups as possible where they are.
- ``plan_microbatches`` / ``plan_step``: a rank's samples into micro-batches under a token budget, a
  group's responses in the same micro-batch where the budget allows (so its image runs through the
  vision tower once, see ``packing.pack``), and the same micro-batch count on every rank, padded with the
  3-token filler (not a rerun of a real micro-batch: same collectives, almost no compute).
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Hashable, Sequence

import torch

_warned_oversized = False


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's strided share of a global batch."""
    return items[rank::world]


def _ffd(units: list[tuple[int, list[int]]], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing of (tokens, members) units into bins of ``max_tokens``; ties by first member."""
    bins: list[list[int]] = []
    room: list[int] = []
    for size, members in sorted(units, key=lambda u: (-u[0], u[1][0])):
        for b, free in enumerate(room):
            if size <= free:
                bins[b].extend(members)
                room[b] -= size
                break
        else:
            bins.append(list(members))
            room.append(max(max_tokens - size, 0))
    return bins


def plan_microbatches(lengths: list[int], max_tokens: int,
                      groups: Sequence[Hashable] | None = None) -> list[list[int]]:
    """One rank's samples (their token ``lengths``) in micro-batches of at most ``max_tokens`` tokens →
    ``plan[micro]`` = sample indices, by first-fit decreasing.

    ``groups[i]``: the group of sample i (samples of a group share an image). A group that fits the
    budget is placed as one unit; a larger one is cut into budget-sized parts (first-fit decreasing over
    its members), each placed as a unit. Without ``groups`` every sample is its own unit. A sample longer
    than the budget gets a micro-batch of its own (warned once). Deterministic: ties go to the lower
    index."""
    global _warned_oversized
    if max_tokens <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) must be positive")
    oversized = [i for i, n in enumerate(lengths) if n > max_tokens]
    if oversized and not _warned_oversized:
        warnings.warn(f"a sample of {lengths[oversized[0]]} tokens exceeds max_tokens_per_microbatch="
                      f"{max_tokens}; it runs as a micro-batch of its own", stacklevel=2)
        _warned_oversized = True
    members: dict[Hashable, list[int]] = {}
    for i in range(len(lengths)):
        if lengths[i] <= max_tokens:
            members.setdefault(groups[i] if groups is not None else ("sample", i), []).append(i)
    units: list[tuple[int, list[int]]] = []
    for idx in members.values():
        total = sum(lengths[i] for i in idx)
        if total <= max_tokens:
            units.append((total, idx))
        else:
            units += [(sum(lengths[i] for i in part), sorted(part))
                      for part in _ffd([(lengths[i], [i]) for i in idx], max_tokens)]
    # oversized samples first, longest first: where first-fit decreasing meets them
    return [[i] for i in sorted(oversized, key=lambda i: (-lengths[i], i))] + _ffd(units, max_tokens)


def plan_step(samples: list, lengths: list[int], max_tokens: int, filler,
              groups: Sequence[Hashable] | None = None) -> tuple[list[list], int]:
    """This rank's micro-batches by token budget, padded to the same count on every rank (collectives
    must line up) with ``[filler]`` micro-batches (a zero-loss 3-token item with the smallest image, so a
    padding micro-batch joins the same FSDP gathers as a real one at almost no cost). Returns
    (micro-batches, number of real ones): the real ones come first."""
    from . import dist

    plan = plan_microbatches(lengths, max_tokens, groups) if samples else []
    micro = [[samples[i] for i in mb] for mb in plan if mb]
    count = int(dist.all_reduce(torch.tensor([len(micro)]), "max").item())
    return micro + [[filler] for _ in range(count - len(micro))], len(micro)


def karmarkar_karp(weights: Sequence[float], k: int) -> list[list[int]]:
    """Largest differencing method: ``weights`` into ``k`` parts of near-equal sums → ``parts[j]`` =
    item indices. Each item starts as a k-part partial solution; the two with the largest spread are
    merged, the heaviest part of one with the lightest of the other, until one is left. Deterministic."""
    if k <= 0:
        raise ValueError(f"k ({k}) must be positive")
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for i, w in enumerate(weights):
        parts = [(float(w), [i])] + [(0.0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-float(w), i, parts))
    if not heap:
        return [[] for _ in range(k)]
    tie = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda p: (-p[0], min(p[1], default=-1)))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(members) for _, members in heap[0][2]]


def balance_groups(group_tokens: Sequence[float], owners: Sequence[int], world: int) -> list[int]:
    """New owner rank of each group: Karmarkar-Karp parts of the groups' token counts, each part given to
    the rank that already holds most of its tokens (fewest bytes moved); ``owners[g]``: where group g is
    now; a placement already as even as Karmarkar-Karp's stays as it is. Deterministic: every rank
    computes the same answer from the all-gathered counts."""
    parts = karmarkar_karp(group_tokens, world)
    now = [sum(t for t, o in zip(group_tokens, owners) if o == r) for r in range(world)]
    if max(now) <= max(sum(group_tokens[g] for g in part) for part in parts):
        return list(owners)
    overlap = [[sum(group_tokens[g] for g in part if owners[g] == r) for r in range(world)] for part in parts]
    new_owner = [0] * len(group_tokens)
    free = set(range(world))
    for p in sorted(range(world), key=lambda p: -sum(group_tokens[g] for g in parts[p])):
        rank = max(sorted(free), key=lambda r: overlap[p][r])
        free.remove(rank)
        for g in parts[p]:
            new_owner[g] = rank
    return new_owner


def rank_imbalance(tokens_per_rank: Sequence[float]) -> float:
    """max over mean of the ranks' token counts (1 = perfectly even): the step waits for the busiest."""
    mean = sum(tokens_per_rank) / max(len(tokens_per_rank), 1)
    return max(tokens_per_rank) / mean if mean > 0 else 1.0


def split_groups(groups: Sequence[Hashable], parts: int) -> list[range]:
    """``parts`` consecutive slices of a list whose items come in runs of equal group ids, cut at the run
    boundary nearest to each even cut (so a group's responses stay in one mini-batch, sharing their image);
    with equal-size groups that divide evenly, the same slices as cutting by count."""
    n = len(groups)
    starts = [i for i in range(n) if i == 0 or groups[i] != groups[i - 1]] + [n]
    cuts = [0]
    for m in range(1, parts):
        target = m * n // parts
        cuts.append(max(cuts[-1], min(starts, key=lambda s: (abs(s - target), s))))
    cuts.append(n)
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]
