"""Fixtures for the policy tests: tiny configs and transformers' DeepseekV3 twin of a model."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3

from r1kit.policy import DeepseekV3Config, DeepseekV3ForCausalLM, preset_config

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}


@pytest.fixture
def yarn() -> dict:
    """YaRN rope parameters for short test sequences (factor 4 over 32 original positions)."""
    return dict(YARN)


@pytest.fixture
def tiny_config() -> Callable[..., DeepseekV3Config]:
    """preset "tiny-debug" with overrides."""
    return lambda **overrides: preset_config("tiny-debug", **overrides)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init (norm gains around 1, routing biases non-zero) so comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


@pytest.fixture
def twin() -> Callable[[DeepseekV3ForCausalLM], TransformersDeepseekV3]:
    """transformers' DeepseekV3ForCausalLM holding the same weights as our model (MTP excluded)."""

    def build(model: DeepseekV3ForCausalLM) -> TransformersDeepseekV3:
        reference = TransformersDeepseekV3(copy.deepcopy(model.config)).eval()
        main = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
        reference.load_state_dict(main, strict=True)
        return reference

    return build


@pytest.fixture
def randomized() -> Callable[[torch.nn.Module, int], None]:
    return randomize
