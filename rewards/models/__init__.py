"""Model-based rewards: a sequence-classification reward model and a generative judge.

Importing this package imports torch and transformers; `rewards` itself does not.
"""

from r1kit.rewards.models.generators import EngineGenerator, OpenAIGenerator, TextGenerator
from r1kit.rewards.models.judge import JUDGE_TEMPLATE, GenerativeJudge, parse_verdict
from r1kit.rewards.models.reward_model import RewardModelReward

__all__ = [
    "JUDGE_TEMPLATE",
    "EngineGenerator",
    "GenerativeJudge",
    "OpenAIGenerator",
    "RewardModelReward",
    "TextGenerator",
    "parse_verdict",
]
