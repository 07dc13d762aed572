"""The recipe's choices around keep routing and keep sampling mask."""

import pytest

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments
from r1kit.recipes.pipeline import check_sampler_options, routing_replay
from tests.rollout.test_torch_engine import tiny_llama


@pytest.mark.parametrize("option", ["keep_routing", "keep_sampling_mask"])
def test_vllm_rollouts_refuse_what_only_the_built_in_engine_records(option):
    config = GRPOConfig(**{option: True})
    check_sampler_options(RecipeArguments(rollout="worker"), config)
    with pytest.raises(ConfigError, match=f"--{option} false"):
        check_sampler_options(RecipeArguments(rollout="vllm"), config)


def test_a_dense_policy_has_no_routing_to_replay(debug_policy, capsys):
    config = GRPOConfig(keep_routing=True)
    assert routing_replay(config, debug_policy, announce=True) is config
    assert routing_replay(config, tiny_llama(), announce=True).keep_routing is False
    assert "LlamaForCausalLM has no MoE layers" in capsys.readouterr().out


def test_the_mla_decode_path_is_checked():
    with pytest.raises(ConfigError, match="--mla_decode must be one of absorbed, expanded"):
        RecipeArguments(mla_decode="latent")
