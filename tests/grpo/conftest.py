"""A tiny but real GRPO set-up: our tiny-debug policy, the built-in engine, the reward suite, arithmetic prompts."""

from __future__ import annotations

import copy

import pytest

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.trainer import GRPOTrainer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rollout.torch_engine import TorchRolloutEngine


def digit_share(completions: list[str], **_) -> list[float]:
    """A reward the tiny random policy can learn within a few steps: the share of digit characters."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


@pytest.fixture
def prompts():
    return arithmetic_dataset(64, seed=5).remove_columns("completion")


@pytest.fixture
def make_trainer(arithmetic_tokenizer, debug_policy, prompts, tmp_path):
    """make_trainer(policy=None, num_speculative_tokens=0, **config_overrides) -> GRPOTrainer (suites are
    closed at teardown)."""
    suites = []

    def make(policy=None, num_speculative_tokens=0, **overrides):
        policy = copy.deepcopy(debug_policy) if policy is None else policy
        settings = dict(
            num_generations=4,
            prompts_per_step=4,
            max_completion_length=8,
            learning_rate=3e-3,
            max_steps=3,
            micro_batch_size=8,
            output_dir=str(tmp_path / "run"),
            seed=0,
        )
        config = GRPOConfig(**{**settings, **overrides})
        suite = RewardSuite([digit_share], config=RewardSuiteConfig(num_workers=0))
        suites.append(suite)
        plain = copy.deepcopy(policy)
        plain = plain.merge_and_unload() if hasattr(plain, "merge_and_unload") else plain  # engines hold no adapter
        engine = TorchRolloutEngine(plain, arithmetic_tokenizer, num_speculative_tokens=num_speculative_tokens)
        return GRPOTrainer(config, policy, arithmetic_tokenizer, engine, suite, prompts, accuracy_reward=None)

    yield make
    for suite in suites:
        suite.close()
