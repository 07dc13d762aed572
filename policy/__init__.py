"""The policy model: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) as a transformers model, presets, load_policy."""

from policy.cache import LatentCache
from policy.config import DeepseekV3Config
from policy.loading import load_policy
from policy.modeling import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3PreTrainedModel
from policy.presets import PRESETS, preset_config

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
        from policy.callbacks import RoutingBiasCallback

        return RoutingBiasCallback
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
