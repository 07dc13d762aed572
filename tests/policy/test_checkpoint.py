"""Checkpoints: released layout out, any of released / transformers / ours in, nothing dropped or invented."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config as TransformersConfig
from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.checkpoint import from_released, to_released


@pytest.fixture
def model(tiny_config, randomized) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    randomized(model)
    return model


def saved_names(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_released_layout_names(model):
    released = dict(to_released(model.state_dict(), model.config))
    mtp = "model.layers.2."  # num_hidden_layers = 2: the MTP module is layer 2
    for name in (
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "embed_tokens.weight",
    ):
        assert mtp + name in released
    assert released[mtp + "shared_head.head.weight"].data_ptr() == model.lm_head.weight.data_ptr()  # no copy
    assert released[mtp + "mlp.experts.7.up_proj.weight"].shape == (16, 32)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in released
    assert not any(".gate_up_proj" in name or name.startswith("mtp.") for name in released)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    torch.testing.assert_close(released["model.layers.1.mlp.experts.3.up_proj.weight"], gate_up[3, 16:])


def test_round_trip_is_exact(model):
    ours, skipped = from_released(to_released(model.state_dict(), model.config), model.config)
    assert not skipped and ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_save_pretrained_is_readable_by_transformers(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["seq_balance_alpha"] == model.config.seq_balance_alpha
    theirs = TransformersDeepseekV3.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_from_pretrained_restores_every_tensor(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)  # unsharded over sharded: the old shards and index go
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


def test_from_pretrained_reads_the_generation_config(model, tmp_path):
    model.generation_config.eos_token_id = [1, 7]  # e.g. end of turn as well as end of text
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.save_pretrained(tmp_path)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path).generation_config
    assert loaded.eos_token_id == [1, 7] and loaded.do_sample and loaded.temperature == 0.6 and loaded.use_cache


def test_from_pretrained_in_bf16_keeps_routing_bias_fp32(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)


def test_transformers_checkpoint_without_mtp_loads_with_fresh_mtp_and_one_warning(model, twin, tmp_path, caplog):
    twin(model).save_pretrained(tmp_path)  # per-expert keys, no MTP layer
    with caplog.at_level(logging.WARNING, logger="r1kit.policy.streaming_load"):
        fresh = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "r1kit.policy.streaming_load"]
    assert "no weights for MTP module(s) 0; initialised 20 MTP tensors fresh: mtp.0." in warning
    assert torch.equal(fresh.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)
    no_mtp = DeepseekV3ForCausalLM.from_pretrained(tmp_path, num_nextn_predict_layers=0)
    assert len(no_mtp.mtp) == 0


def test_checkpoint_of_transformers_default_config_loads_and_matches_its_logits(randomized, tmp_path, caplog):
    # the installed transformers' own defaults, only shrunk: whatever it now says about MTP, it saves none
    sizes = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
    }
    theirs = TransformersDeepseekV3(TransformersConfig(**sizes)).eval()
    randomized(theirs)
    theirs.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1kit.policy.streaming_load"):
        ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert len(ours.mtp) == TransformersConfig().num_nextn_predict_layers
    assert len(caplog.records) == (1 if len(ours.mtp) else 0)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)


def test_checkpoint_with_part_of_an_mtp_module_fails_naming_the_rest(model, tmp_path):
    rewrite(tmp_path, model, lambda t: t.pop("model.layers.2.eh_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors: mtp\.0\.eh_proj\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_dropping_mtp_is_explicit_and_logged(model, tmp_path, caplog):
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="r1kit.policy.streaming_load"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, num_nextn_predict_layers=0)
    assert "left 44 checkpoint tensors unused" in caplog.text


def rewrite(tmp_path, model, edit) -> None:
    model.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in to_released(model.state_dict(), model.config)}
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(1)}), "unexpected.*mlp.extra"),
        (lambda t: t.pop("model.norm.weight"), "lacks 1 tensors: model.norm.weight"),
        (lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"), r"experts\.\{5\}\.up_proj"),
        (
            lambda t: t["model.layers.2.embed_tokens.weight"].add_(1),
            "differs from 'model.embed_tokens.weight'",
        ),
        (
            lambda t: t.update({"model.layers.3.enorm.weight": torch.ones(32)}),
            "beyond num_nextn_predict_layers",
        ),
    ],
)
def test_bad_checkpoints_fail_naming_the_tensor(model, tmp_path, edit, message):
    rewrite(tmp_path, model, edit)
    with pytest.raises(ValueError, match=message):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_unknown_override_and_missing_directory(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not_a_field"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, not_a_field=1)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_load_state_dict_accepts_the_released_layout(model, tiny_config):
    # transformers' Trainer resumes with model.load_state_dict(<model.safetensors>, strict=False)
    released = {k: v.clone() for k, v in to_released(model.state_dict(), model.config)}
    fresh = DeepseekV3ForCausalLM(tiny_config())
    result = fresh.load_state_dict(released, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_fused_expert_checkpoint_loads(model, twin, tmp_path):
    # a checkpoint holding transformers' in-memory names (3-D experts) and no MTP weights
    twin(model).config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in twin(model).state_dict().items()}, tmp_path / "model.safetensors")
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert name.startswith("mtp.") or torch.equal(loaded.state_dict()[name], tensor), name
