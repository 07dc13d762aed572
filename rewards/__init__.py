"""Rewards for GRPO: the reward contract (TRL's), a registry of reward functions, and the suite that runs them.

    from r1kit.rewards import RewardSuite, RewardSuiteConfig, register, resolve

    with RewardSuite(["math_accuracy", "format"], weights=[1.0, 0.2]) as suite:
        result = suite.score(prompts, completions, {"answer": answers}, trainer_state=state)

Rule-based rewards live in `r1kit.rewards.rules` and are registered by name on import;
model-based rewards (a reward model, a generative judge) live in
`r1kit.rewards.models`, which imports torch and transformers only when used.
`IsolatedReward` runs one batched reward in a process of its own.

The suite and its result are imported lazily: reward worker processes import
this package to load reward functions and should not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r1kit.rewards.isolated import IsolatedReward
from r1kit.rewards.protocol import (
    RewardFn,
    RewardLog,
    RewardOutputError,
    call_reward,
    completion_text,
    reward_name,
    trl_completions,
)
from r1kit.rewards.registry import register, registered_names, resolve
from r1kit.rewards.rules import (
    CodeExecution,
    FormatReward,
    LanguageConsistency,
    MathAccuracy,
    OverlongPenalty,
    code_execution,
    format_reward,
    language_consistency,
    length_penalty,
    math_accuracy,
)

if TYPE_CHECKING:
    from r1kit.rewards.suite import RewardError, RewardFailure, RewardResult, RewardSuite, RewardSuiteConfig

_LAZY = {"RewardError", "RewardFailure", "RewardResult", "RewardSuite", "RewardSuiteConfig"}

__all__ = [
    "CodeExecution",
    "FormatReward",
    "IsolatedReward",
    "LanguageConsistency",
    "MathAccuracy",
    "OverlongPenalty",
    "RewardError",
    "RewardFailure",
    "RewardFn",
    "RewardLog",
    "RewardOutputError",
    "RewardResult",
    "RewardSuite",
    "RewardSuiteConfig",
    "call_reward",
    "code_execution",
    "completion_text",
    "format_reward",
    "language_consistency",
    "length_penalty",
    "math_accuracy",
    "register",
    "registered_names",
    "resolve",
    "reward_name",
    "trl_completions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from r1kit.rewards import suite

        return getattr(suite, name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
