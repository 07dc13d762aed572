import math

import pytest
import torch

from r1kit.grpo.advantages import compute_advantages, zero_std_groups


def paper_advantages(rewards: list[list[float]], eps: float) -> list[list[float]]:
    """DeepSeekMath outcome supervision, one group at a time, with Bessel-corrected std."""
    out = []
    for group in rewards:
        g = len(group)
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
        out.append([(r - mean) / (std + eps) for r in group])
    return out


def test_grpo_advantages_match_paper_formula():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 2.0, -1.0, 0.25], [3.0, 3.0, 3.0, 3.0]])
    expected = torch.tensor(paper_advantages(rewards.tolist(), eps=1e-4))
    torch.testing.assert_close(compute_advantages(rewards, "grpo", eps=1e-4), expected)


def test_hand_computed_group():
    # mean 0.5, unbiased std sqrt(1/3): advantages +-0.866
    adv = compute_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), "grpo", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 1.0, -1.0]]) * math.sqrt(3) / 2)


def test_dr_grpo_skips_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]])
    torch.testing.assert_close(
        compute_advantages(rewards, "dr_grpo"),
        torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]]),
    )


def test_batch_std_divides_by_the_std_of_the_whole_batch_as_trl():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]])
    # TRL's scale_rewards="batch": (r - group mean) / (std(all rewards) + 1e-4), std Bessel-corrected
    flat = rewards.flatten().tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((r - mean) ** 2 for r in flat) / (len(flat) - 1))
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]]) / (std + 1e-4)
    torch.testing.assert_close(compute_advantages(rewards, "batch_std", eps=1e-4), expected)


def test_equal_rewards_give_zero_advantage_and_are_flagged():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert compute_advantages(rewards)[0].abs().max() == 0
    assert zero_std_groups(rewards).tolist() == [True, False]


def test_bad_shapes_and_names_raise():
    with pytest.raises(ValueError, match="G >= 2"):
        compute_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        compute_advantages(torch.ones(2, 2), "nope")
