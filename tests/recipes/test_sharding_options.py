"""The recipe's --fsdp and --expert_parallel: what they combine with, and which checkpoints they shard."""

import pytest

from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments
from r1kit.recipes.pipeline import check_sharding, sharded_policy
from tests.conftest import save_chat_model


def test_expert_parallelism_needs_fsdp_and_a_divisor_of_the_processes():
    check_sharding(RecipeArguments(fsdp=True, expert_parallel=2), num_processes=4)
    with pytest.raises(ConfigError, match="add --fsdp"):
        check_sharding(RecipeArguments(expert_parallel=2), num_processes=2)
    with pytest.raises(ConfigError, match="must divide the 4 processes"):
        check_sharding(RecipeArguments(fsdp=True, expert_parallel=3), num_processes=4)


@pytest.mark.parametrize("flag", [{"lora_r": 8}, {"fp8": True}, {"gradient_checkpointing": True}])
def test_fsdp_refuses_what_it_was_not_tested_with(flag):
    with pytest.raises(ConfigError, match=f"--{next(iter(flag))} is not supported with --fsdp"):
        check_sharding(RecipeArguments(fsdp=True, **flag), num_processes=2)


def test_fsdp_shards_deepseek_v3_checkpoints_only(tmp_path):
    save_chat_model(tmp_path)
    with pytest.raises(ConfigError, match="--fsdp shards our DeepSeek-V3"):
        sharded_policy(str(tmp_path), mesh=None, dtype=None, device=None)
