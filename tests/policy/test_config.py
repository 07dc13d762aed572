"""DeepseekV3Config: transformers' field names, our options, validation that names the field."""

from __future__ import annotations

import json

import pytest
from transformers import DeepseekV3Config as TransformersConfig

from r1kit.policy import DeepseekV3Config


def test_config_json_round_trips_through_transformers_config(tmp_path, tiny_config):
    config = tiny_config(seq_balance_alpha=0.01, router_bias_update_speed=0.002, mtp_loss_weight=0.1)
    config.save_pretrained(tmp_path)
    theirs = TransformersConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "deepseek_v3"
    assert theirs.n_group == config.n_group and theirs.kv_lora_rank == config.kv_lora_rank
    back = DeepseekV3Config(**theirs.to_dict())
    assert (back.seq_balance_alpha, back.router_bias_update_speed, back.mtp_loss_weight) == (0.01, 0.002, 0.1)


def test_config_json_states_the_routing_as_the_released_one_does(tmp_path, tiny_config):
    """vLLM reads these two keys and otherwise routes by softmax without the balancing bias."""
    tiny_config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["topk_method"], written["scoring_func"]) == ("noaux_tc", "sigmoid")


def test_released_rope_scaling_key_becomes_yarn_parameters():
    # config.json of the released checkpoint spells YaRN as the legacy `rope_scaling` with `type`
    config = DeepseekV3Config(
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
    )
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["factor"] == 40
    assert config.num_mtp_layers == config.num_nextn_predict_layers == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_group=3), "n_group"),
        (dict(n_group=8), "n_group"),  # one expert per group: no top-2 group score
        (dict(topk_group=5), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(num_key_value_heads=1), "num_key_value_heads"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=3), "first_k_dense_replace"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
        (dict(seq_balance_alpha=-1.0), "seq_balance_alpha"),
        (dict(router_bias_update_speed=-0.1), "router_bias_update_speed"),
        (dict(mtp_loss_weight=-0.3), "mtp_loss_weight"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
        (dict(scoring_func="softmax"), "scoring_func"),  # DeepSeek-V2's router, not built
        (dict(topk_method="greedy"), "topk_method"),
    ],
)
def test_invalid_fields_are_named(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
