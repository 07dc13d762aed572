"""The policy model: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) as a transformers model, presets, load_policy."""

from r1kit.policy.cache import LatentCache
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.loading import load_policy
from r1kit.policy.modeling import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3PreTrainedModel
from r1kit.policy.presets import PRESETS, preset_config

__all__ = [
    "PRESETS",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3PreTrainedModel",
    "LatentCache",
    "RoutingBiasCallback",
    "load_policy",
    "preset_config",
]


def __getattr__(name: str):
    # The Trainer callback pulls in transformers' Trainer stack (and peft); rollout workers never need it.
    if name == "RoutingBiasCallback":
        from r1kit.policy.callbacks import RoutingBiasCallback

        return RoutingBiasCallback
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
