"""Model-based rewards: a sequence-classification reward model and a generative judge.

Importing this package imports torch and transformers; `rewards` itself does not.
"""

from rewards.models.generators import EngineGenerator, OpenAIGenerator, TextGenerator
from rewards.models.judge import JUDGE_TEMPLATE, GenerativeJudge, parse_verdict
from rewards.models.reward_model import RewardModelReward

__all__ = [
    "JUDGE_TEMPLATE",
    "EngineGenerator",
    "GenerativeJudge",
    "OpenAIGenerator",
    "RewardModelReward",
    "TextGenerator",
    "parse_verdict",
]
