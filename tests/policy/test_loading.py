"""load_policy: ours for deepseek_v3 checkpoints, transformers' model otherwise, clear path errors."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3
from transformers import LlamaConfig, LlamaForCausalLM

from r1kit.policy import DeepseekV3ForCausalLM, load_policy
from r1kit.policy.fp8 import FP8Config, FP8Linear


def test_our_checkpoint_loads_as_ours(tiny_config, tmp_path):
    DeepseekV3ForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = load_policy(tmp_path, dtype=torch.bfloat16, mtp_loss_weight=0.1)
    assert isinstance(model, DeepseekV3ForCausalLM)
    assert model.dtype == torch.bfloat16 and model.config.mtp_loss_weight == 0.1


def test_transformers_deepseek_checkpoint_loads_as_ours(tiny_config, twin, tmp_path):
    twin(DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=0))).save_pretrained(tmp_path)
    assert isinstance(TransformersDeepseekV3.from_pretrained(tmp_path), TransformersDeepseekV3)
    assert isinstance(load_policy(tmp_path, num_nextn_predict_layers=0), DeepseekV3ForCausalLM)


def test_other_causal_lms_load_through_auto_model(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_policy(tmp_path, dtype="float32")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32


@pytest.mark.parametrize("path", ["/no/such/model", "./missing", "a/b/c"])
def test_missing_paths_fail_fast_and_clearly(path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(path)
    assert time.perf_counter() - start < 1.0  # no hub retries


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_policy(tmp_path)


def test_fp8_for_other_causal_lms_converts_their_projections_and_survives_a_save(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "plain")
    model = load_policy(tmp_path / "plain", fp8=FP8Config(block_size=16))
    converted = {name for name, module in model.named_modules() if isinstance(module, FP8Linear)}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert {name.rsplit(".", 1)[-1] for name in converted} == set(projections) and len(converted) == 7
    model.save_pretrained(tmp_path / "fp8")
    again = load_policy(tmp_path / "fp8")
    assert again.config.fp8 == model.config.fp8 and isinstance(again.model.layers[0].mlp.up_proj, FP8Linear)
    plain = load_policy(tmp_path / "fp8", fp8=False)
    assert plain.config.fp8 is None and not any(isinstance(m, FP8Linear) for m in plain.modules())
