"""Presets: tiny-debug exercises every feature; the DeepSeek-V3 preset carries the released numbers."""

from __future__ import annotations

import pytest
import torch

from r1kit.policy import PRESETS, DeepseekV3ForCausalLM, preset_config


def test_tiny_debug_exercises_every_feature():
    config = preset_config("tiny-debug")
    assert config.n_group >= 2 and config.topk_group < config.n_group
    assert 0 < config.first_k_dense_replace < config.num_hidden_layers  # dense and MoE layers
    assert config.n_shared_experts >= 1 and config.num_nextn_predict_layers >= 1
    model = DeepseekV3ForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.aux_loss > 0 and out.mtp_loss > 0


def test_tiny_needs_the_tokenizer_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        preset_config("tiny")
    config = preset_config("tiny", vocab_size=1000)
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) == (160, 4, 8)
    assert config.first_k_dense_replace == 1 and config.num_experts_per_tok == 2


def test_deepseek_v3_preset_has_the_released_numbers():
    config = preset_config("deepseek-v3")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (61, 7168, 128)
    assert (config.kv_lora_rank, config.q_lora_rank, config.qk_rope_head_dim) == (512, 1536, 64)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
        256,
        8,
        2048,
    )
    assert (config.n_group, config.topk_group, config.first_k_dense_replace) == (8, 4, 3)
    assert config.routed_scaling_factor == 2.5 and config.router_bias_update_speed == 0.001
    assert config.seq_balance_alpha == 1e-4 and config.mtp_loss_weight == 0.3
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 40.0


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="choose from"):
        preset_config("huge")
    with pytest.raises(ValueError, match="hiden_size"):
        preset_config("tiny-debug", hiden_size=3)
    assert set(PRESETS) >= {"tiny-debug", "tiny", "deepseek-v3"}
