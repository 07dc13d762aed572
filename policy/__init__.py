"""The policy model: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) as a transformers model, presets, load_policy."""

from policy.cache import LatentCache
from policy.callbacks import RoutingBiasCallback
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
