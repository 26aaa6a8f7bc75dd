"""rlcs_fast.schedule on its own: rank shares, group-aware micro-batch plans, filler padding, Karmarkar-Karp
rank balance, group-aligned mini-batches."""

from __future__ import annotations

import random

import pytest
import torch

from rlcs_fast.schedule import (
    balance_groups,
    karmarkar_karp,
    plan_step,
    rank_imbalance,
    rank_share,
    split_groups,
)


def test_rank_share_is_a_stride():
    assert rank_share(list(range(7)), 1, 3) == [1, 4]


def test_plan_step_pads_with_fillers_not_reruns(monkeypatch):
    from rlcs_fast import dist

    # another rank needs 3 micro-batches: this one pads its 1 with two fillers (3 tokens each), where
    # the old planner reran its largest micro-batch (up to the whole token budget) twice
    monkeypatch.setattr(dist, "all_reduce", lambda t, op="sum": torch.maximum(t, torch.tensor([3])))
    micro, n_real = plan_step(["a", "b"], [40, 50], 100, "filler")
    assert n_real == 1 and micro == [["b", "a"], ["filler"], ["filler"]]
    micro, n_real = plan_step([], [], 100, "filler")
    assert n_real == 0 and micro == [["filler"]] * 3


@pytest.mark.parametrize("seed", range(5))
def test_karmarkar_karp_partitions_and_balances(seed):
    rng = random.Random(seed)
    weights = [rng.lognormvariate(6, 0.8) for _ in range(rng.randint(30, 200))]
    k = rng.choice([2, 3, 8])
    parts = karmarkar_karp(weights, k)
    assert len(parts) == k and sorted(i for p in parts for i in p) == list(range(len(weights)))
    assert parts == karmarkar_karp(weights, k)  # deterministic
    sums = [sum(weights[i] for i in p) for p in parts]
    # far better than a stride split, and within one item of perfect
    stride = [sum(weights[i::k]) for i in range(k)]
    assert rank_imbalance(sums) <= rank_imbalance(stride)
    assert max(sums) - min(sums) <= max(weights)


def test_karmarkar_karp_exact_on_a_known_case():
    # {8, 7, 6, 5, 4} into 2: 15 / 15 exists; LDM finds 16 / 14 (its documented limit), a greedy 17 / 13
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts) in ([15, 15], [14, 16])


def test_balance_groups_keeps_parts_where_their_tokens_are():
    tokens = [100, 100, 100, 100]
    owners = [0, 0, 1, 1]  # already balanced: nothing moves
    assert balance_groups(tokens, owners, 2) == owners
    owners = [0, 0, 0, 0]  # all on rank 0: half move, and rank 0 keeps a part
    new = balance_groups(tokens, owners, 2)
    assert sorted(new) == [0, 0, 1, 1]


def test_balance_groups_reaches_1_05_on_8_ranks():
    rng = random.Random(0)
    groups = [sum(min(int(rng.lognormvariate(6.0, 0.9)), 2048) + 300 for _ in range(10)) for _ in range(512)]
    owners = [g % 8 for g in range(512)]
    before = [sum(t for t, o in zip(groups, owners) if o == r) for r in range(8)]
    new = balance_groups(groups, owners, 8)
    after = [sum(t for t, o in zip(groups, new) if o == r) for r in range(8)]
    assert rank_imbalance(after) <= 1.05 and rank_imbalance(after) < rank_imbalance(before)


def test_split_groups_cuts_at_group_boundaries():
    groups = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert split_groups(groups, 2) == [range(0, 8), range(8, 16)]
    groups = [0] * 4 + [1] * 3 + [2] * 4  # dynamic sampling left uneven groups
    spans = split_groups(groups, 2)
    assert [len(s) for s in spans] in ([4, 7], [7, 4])
    assert all(groups[s.start] != groups[s.start - 1] for s in spans if s.start)
