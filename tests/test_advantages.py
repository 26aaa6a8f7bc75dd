"""GRPO advantage math against verl's formulas, written here the way verl writes them."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from rlcs_fast.advantages import dynamic_sampling_mask, group_advantages, overlong_penalty

# The math reward's values: ties inside a group are the common case, not an edge case.
REWARD_LEVELS = torch.tensor([0.0, 0.1, 0.9, 1.0], dtype=torch.float64)


def verl_grpo_outcome_advantage(
    scores: torch.Tensor, index: list, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True
) -> torch.Tensor:
    """verl/trainer/ppo/core_algos.py ``compute_grpo_outcome_advantage`` on outcome scores [bs]."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx] = torch.tensor(0.0, dtype=scores.dtype)
            id2std[idx] = torch.tensor(1.0, dtype=scores.dtype)
        else:
            group = torch.stack(id2score[idx])
            id2mean[idx] = torch.mean(group)
            id2std[idx] = torch.std(group)
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores


def random_rewards(gen: torch.Generator, num_prompts: int, group_size: int) -> torch.Tensor:
    """Half the groups from the reward levels (with forced all-equal groups), half continuous."""
    discrete = REWARD_LEVELS[torch.randint(0, 4, (num_prompts, group_size), generator=gen)]
    tied = torch.rand(num_prompts, 1, generator=gen) < 0.3
    discrete = torch.where(tied, discrete[:, :1].expand_as(discrete), discrete)
    continuous = torch.randn(num_prompts, group_size, generator=gen, dtype=torch.float64) * 3
    use_discrete = torch.rand(num_prompts, 1, generator=gen) < 0.5
    return torch.where(use_discrete, discrete, continuous).reshape(-1)


@pytest.mark.parametrize("group_size", [2, 3, 5, 8])
@pytest.mark.parametrize("std_norm", [True, False])
def test_group_advantages_match_verl(group_size: int, std_norm: bool) -> None:
    gen = torch.Generator().manual_seed(1000 + group_size)
    rewards = random_rewards(gen, num_prompts=40, group_size=group_size)
    uids = [f"prompt-{i // group_size}" for i in range(rewards.numel())]
    expected = verl_grpo_outcome_advantage(rewards, uids, norm_adv_by_std_in_grpo=std_norm)

    ours = group_advantages(rewards, group_size, std_norm=std_norm)
    assert ours.shape == rewards.shape and ours.dtype == torch.float64

    grouped = rewards.reshape(-1, group_size)
    tied = (grouped == grouped[:, :1]).all(dim=1).repeat_interleave(group_size)
    assert tied.any() and (~tied).any(), "the draw must contain tied and untied groups"
    torch.testing.assert_close(ours[~tied], expected[~tied], rtol=1e-9, atol=1e-9)
    # verl divides a float mean's last-bit error by eps; no spread must mean exactly no advantage.
    assert torch.all(ours[tied] == 0)
    assert torch.all(expected[tied].abs() < 1e-6)


def test_group_advantages_float32_rewards_follow_float64_math() -> None:
    gen = torch.Generator().manual_seed(7)
    rewards = random_rewards(gen, num_prompts=16, group_size=4)
    ours = group_advantages(rewards.float(), 4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(
        ours.double(), group_advantages(rewards.float().double(), 4), rtol=1e-6, atol=1e-6
    )


def test_advantages_are_centered_and_scaled_per_group() -> None:
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(12 * 6, generator=gen, dtype=torch.float64)
    adv = group_advantages(rewards, 6, eps=0.0).reshape(12, 6)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.std(dim=1), torch.ones(12, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Ordering within a group is preserved: a better response never gets a smaller advantage.
    grouped = rewards.reshape(12, 6)
    assert torch.equal(adv.argsort(dim=1), grouped.argsort(dim=1))


def test_group_of_one_gives_zero_where_verl_gives_the_raw_reward() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.9, 0.1])
    ours = group_advantages(rewards, 1)
    assert torch.equal(ours, torch.zeros(4))
    # verl's singleton branch (mean 0, std 1) passes the reward through: no baseline, not an advantage.
    expected_verl = verl_grpo_outcome_advantage(rewards.double(), [0, 1, 2, 3])
    torch.testing.assert_close(expected_verl, rewards.double() / (1 + 1e-6))
    assert torch.equal(group_advantages(rewards, 1, std_norm=False), torch.zeros(4))


@pytest.mark.parametrize("std_norm", [True, False])
def test_no_nan_on_degenerate_inputs(std_norm: bool) -> None:
    cases = [
        (torch.zeros(8), 4),
        (torch.full((6,), 0.1), 3),  # 0.1 is not exact: the mean can differ from it in the last bit
        (torch.tensor([1e30, 1e30, -1e30, -1e30]), 2),
        (torch.tensor([1.0, 1.0 + 1e-15, 0.0, 0.0], dtype=torch.float64), 2),
        (torch.tensor([5.0]), 1),
    ]
    for rewards, group_size in cases:
        adv = group_advantages(rewards, group_size, std_norm=std_norm)
        assert torch.isfinite(adv).all(), (rewards, group_size, adv)
    assert torch.equal(group_advantages(torch.full((6,), 0.1), 3, std_norm=std_norm), torch.zeros(6))


def test_integer_and_bool_rewards_give_float32() -> None:
    adv = group_advantages(torch.tensor([1, 0, 0, 1, 1, 1]), 3)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1]), 3))
    assert group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32


def test_shape_errors_are_assertions_naming_the_shape() -> None:
    with pytest.raises(AssertionError, match=r"\(7,\).*groups of 2"):
        group_advantages(torch.zeros(7), 2)
    with pytest.raises(AssertionError, match=r"1-D.*\(2, 4\)"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(AssertionError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(AssertionError, match=r"\(9,\)"):
        dynamic_sampling_mask(torch.zeros(9), 4)


@pytest.mark.parametrize("group_size", [1, 2, 4, 7])
def test_dynamic_sampling_mask_matches_dapo_std_filter(group_size: int) -> None:
    gen = torch.Generator().manual_seed(50 + group_size)
    rewards = random_rewards(gen, num_prompts=30, group_size=group_size)
    mask = dynamic_sampling_mask(rewards, group_size)
    assert mask.shape == (30,) and mask.dtype == torch.bool
    # DAPO keeps a prompt whose rewards are not all the same.
    groups = rewards.reshape(30, group_size).numpy()
    expected = np.array([len(set(g.tolist())) > 1 for g in groups])
    assert np.array_equal(mask.numpy(), expected)
    # verl's recipe tests np.std(g) > 0, which float rounding can make true for a tied group
    # (seven rewards of 0.1): it keeps everything we keep, and sometimes a group with no signal.
    verl_keeps = np.array([np.std(g) > 0 for g in groups])
    assert not np.any(mask.numpy() & ~verl_keeps)
    # Exactly the prompts whose advantages are not all zero.
    adv = group_advantages(rewards, group_size).reshape(30, group_size)
    assert torch.equal(mask, (adv != 0).any(dim=1))


def verl_overlong_reward(
    valid_response_length: int, max_resp_len: int, overlong_buffer_len: int, overlong_penalty_factor: float
) -> float:
    """verl/workers/reward_manager/dapo.py, per response."""
    expected_len = max_resp_len - overlong_buffer_len
    exceed_len = valid_response_length - expected_len
    return min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)


@pytest.mark.parametrize(
    ("max_len", "buffer_len", "factor"), [(1024, 256, 1.0), (20480, 4096, 1.0), (64, 64, 0.5)]
)
def test_overlong_penalty_matches_verl_dapo(max_len: int, buffer_len: int, factor: float) -> None:
    lengths = torch.arange(0, max_len + 1)
    penalty = overlong_penalty(lengths, max_len, buffer_len, factor)
    assert penalty.shape == lengths.shape and penalty.dtype == torch.float32
    expected = torch.tensor([verl_overlong_reward(int(n), max_len, buffer_len, factor) for n in lengths])
    torch.testing.assert_close(penalty, expected.float(), rtol=1e-6, atol=1e-6)
    assert penalty[max_len - buffer_len] == 0 and penalty[max_len] == pytest.approx(-factor)
    assert penalty[max_len - buffer_len // 2] == pytest.approx(-factor / 2, abs=factor / buffer_len)
    assert torch.all(penalty[1:] <= penalty[:-1]), "the penalty never decreases in magnitude with length"


def test_overlong_penalty_clamps_past_max_len_and_rejects_bad_buffers() -> None:
    penalty = overlong_penalty(
        torch.tensor([100, 150, 10_000]), max_len=100, buffer_len=20, penalty_factor=2.0
    )
    assert torch.equal(penalty, torch.tensor([-2.0, -2.0, -2.0]))
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=100, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=100, buffer_len=101)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([1]), max_len=100, buffer_len=10, penalty_factor=-1.0)
