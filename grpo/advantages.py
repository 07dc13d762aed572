"""Group-relative advantages.

GRPO (DeepSeekMath, Shao et al. 2024, eq. 3 with outcome supervision) scores
each of the G completions of a prompt against its own group:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

and gives every token of completion i the advantage A_i. `std` is the unbiased
(Bessel-corrected) standard deviation, as in TRL; a group whose rewards are all
equal gets advantage 0 for every member. Dr. GRPO (Liu et al. 2025) drops the
division by the standard deviation, which re-weights easy and hard prompts.
"batch_std" (PPO Lite, Liu et al. 2025, arXiv 2508.08221; TRL's
scale_rewards="batch") centres on the group mean but divides by the standard
deviation of all B * G rewards of the step.

Estimators are pure functions registered by name: `ADVANTAGE_ESTIMATORS["grpo"]`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from r1kit.grpo.registry import Registry

# fn(rewards (B, G), *, eps) -> advantages (B, G)
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (num_prompts, G) with G >= 2, got {tuple(rewards.shape)}")


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_normalized_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (group std + eps) for rewards (B, G); returns (B, G) float32."""
    _check_groups(rewards)
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def group_centered_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """r - group mean for rewards (B, G), without std scaling (Dr. GRPO); `eps` is unused."""
    _check_groups(rewards)
    rewards = rewards.float()
    return rewards - rewards.mean(dim=1, keepdim=True)


@ADVANTAGE_ESTIMATORS.register("batch_std")
def batch_scaled_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (std of the whole batch + eps) for rewards (B, G); returns (B, G) float32."""
    _check_groups(rewards)
    rewards = rewards.float()
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std() + eps)


def compute_advantages(rewards: Tensor, estimator: str = "grpo", *, eps: float = 1e-4) -> Tensor:
    """Advantages (B, G) of rewards (B, G) under the estimator registered as `estimator`."""
    return ADVANTAGE_ESTIMATORS[estimator](rewards, eps=eps)


def zero_std_groups(rewards: Tensor) -> Tensor:
    """(B,) bool: groups whose G rewards are all equal and therefore carry no learning signal."""
    _check_groups(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "batch_scaled_advantages",
    "compute_advantages",
    "group_centered_advantages",
    "group_normalized_advantages",
    "zero_std_groups",
]
