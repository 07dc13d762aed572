"""The recipe's choices around keep routing, keep sampling mask and MTP speculation."""

import pytest

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments
from r1kit.recipes.pipeline import check_colocated_memory, check_sampler_options, check_speculation, routing_replay
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


def test_speculation_needs_the_built_in_engine_and_mtp_modules(debug_policy):
    args = RecipeArguments(num_speculative_tokens=1)
    check_sampler_options(args, GRPOConfig())
    check_speculation(args, debug_policy)
    with pytest.raises(ConfigError, match="built-in engine"):
        check_sampler_options(RecipeArguments(rollout="vllm", num_speculative_tokens=1), GRPOConfig())
    with pytest.raises(ConfigError, match="LlamaForCausalLM has none"):
        check_speculation(args, tiny_llama())
    check_speculation(RecipeArguments(), tiny_llama())
    with pytest.raises(ConfigError, match=">= 0"):
        RecipeArguments(num_speculative_tokens=-1)


def test_colocated_vllm_takes_a_share_of_the_gpu_that_is_free_or_stops_naming_the_numbers():
    gib = 2**30
    check_colocated_memory(0.3, free_bytes=40 * gib, total_bytes=80 * gib)
    with pytest.raises(
        ConfigError, match=r"take 24\.0 GiB of the GPU's 80\.0 GiB, but only 20\.0 GiB are free.*at most 0\.25"
    ):
        check_colocated_memory(0.3, free_bytes=20 * gib, total_bytes=80 * gib)
    with pytest.raises(ConfigError, match="must be in \\(0, 1\\)"):
        RecipeArguments(vllm_gpu_memory_utilization=1.05)
