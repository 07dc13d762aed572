"""The memory planner: parameter counts of the meta-built model, per-rank sharding, activations, the CLI."""

from __future__ import annotations

import pytest
import torch

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.memory_plan import (
    CATEGORIES,
    GIB,
    PlanConfig,
    category_of,
    count_model_parameters,
    fsdp_unit_of,
    layer_bytes,
    main,
    parse_size,
    plan_memory,
)


@pytest.fixture(scope="module")
def v3():
    config = preset_config("deepseek-v3")
    return config, count_model_parameters(config)


def test_tiny_counts_equal_the_real_model_and_the_categories_sum_to_them():
    config = preset_config("tiny", vocab_size=1000)
    counts = count_model_parameters(config)
    model = DeepseekV3ForCausalLM(config)  # on the CPU
    total = sum(p.numel() for p in model.parameters())
    assert counts.total == total
    assert list(counts.by_category) == list(CATEGORIES) and sum(counts.by_category.values()) == total
    assert sum(dense + routed for dense, routed in counts.units.values()) == total
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    h, inner, experts = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    assert counts.by_category["embedding"] == counts.by_category["output_head"] == 1000 * h
    assert counts.by_category["routed_experts"] == moe_layers * experts * 3 * h * inner
    assert counts.by_category["router"] == moe_layers * experts * h
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    assert counts.by_category["mtp"] == mtp > 0
    assert counts.routed == (moe_layers + config.num_nextn_predict_layers) * experts * 3 * h * inner


def test_every_parameter_name_gets_a_category_and_a_unit_or_an_error():
    assert category_of("model.layers.1.self_attn.q_a_layernorm.weight") == "norms"
    assert category_of("model.layers.0.mlp.gate_proj.weight") == "dense_mlp"
    assert category_of("model.layers.1.mlp.gate.weight") == "router"
    assert category_of("model.layers.1.mlp.shared_experts.up_proj.weight") == "shared_experts"
    assert category_of("mtp.0.block.mlp.experts.down_proj") == "mtp"
    assert fsdp_unit_of("model.norm.weight") == "output head" and fsdp_unit_of("mtp.0.eh_proj.weight") == "mtp 0"
    with pytest.raises(ValueError, match="no category"):
        category_of("model.layers.1.mlp.new_thing.weight")
    with pytest.raises(ValueError, match="no FSDP unit"):
        fsdp_unit_of("extra.weight")


def test_deepseek_v3_is_671b_with_37b_activated_and_v2_lite_15_7b_with_2_4b(v3):
    _, counts = v3
    main_model = counts.total - counts.by_category["mtp"]
    assert abs(main_model - 671.0e9) < 0.1e9
    assert abs(counts.activated - 37e9) < 0.5e9  # DeepSeek-V3: 37B activated per token
    lite = count_model_parameters(preset_config("deepseek-v2-lite"))
    assert abs(lite.total - 15.7e9) < 0.05e9 and lite.by_category["mtp"] == 0
    assert abs(lite.activated - 2.4e9) < 0.1e9  # DeepSeek-V2-Lite: 2.4B activated per token


def test_per_rank_state_falls_as_one_over_the_world_size(v3):
    config, counts = v3
    states = {}
    for dp, ep in ((1, 1), (2, 1), (4, 2), (2, 8), (32, 8)):
        memory = plan_memory(config, counts, PlanConfig(dp=dp, ep=ep))
        states[dp * ep] = memory.parameters
        assert memory.gradients == memory.parameters and memory.optimizer == 2 * memory.parameters
    for world, parameters in states.items():
        assert parameters * world == pytest.approx(counts.total * 4)  # fp32 master weights
    assert states[1] == counts.total * 4


def test_expert_parallelism_shrinks_the_gathered_unit_not_the_sharded_state(v3):
    config, counts = v3
    fsdp_only = plan_memory(config, counts, PlanConfig(dp=256, ep=1))
    with_ep = plan_memory(config, counts, PlanConfig(dp=32, ep=8))
    assert with_ep.parameters == pytest.approx(fsdp_only.parameters)
    assert with_ep.gather < fsdp_only.gather / 4


def test_checkpointing_keeps_fewer_activations(v3):
    config, counts = v3
    full = plan_memory(config, counts, PlanConfig(dp=32, ep=8))
    none = plan_memory(config, counts, PlanConfig(dp=32, ep=8, activation_checkpointing=False))
    assert none.activations > 5 * full.activations
    assert none.total > none.device_memory and not none.fits


def test_bad_meshes_and_options_raise_clear_errors(v3):
    config, counts = v3
    with pytest.raises(ValueError, match=r"ep=3 does not divide the 256 routed experts.*choose ep among \[1, 2, 4"):
        plan_memory(config, counts, PlanConfig(ep=3))
    dense = preset_config("tiny-debug", first_k_dense_replace=2, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no MoE layer"):
        plan_memory(dense, count_model_parameters(dense), PlanConfig(ep=2))
    with pytest.raises(ValueError, match="dp must be >= 1, got 0"):
        PlanConfig(dp=0)
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        PlanConfig(param_dtype="fp8")
    with pytest.raises(ValueError, match="not a number"):
        parse_size("eighty gigs")
    assert parse_size("80GiB") == 80 * GIB and parse_size("80GB") == 80 * 10**9 and parse_size("1.5 KiB") == 1536


def test_the_activation_terms_match_what_autograd_keeps_per_layer():
    config = preset_config("tiny", vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch, seq = 2, 256
    x = torch.randn(batch, seq, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rope = model.model.rotary_emb(torch.arange(seq).expand(batch, -1), x.dtype)
    for index in (0, 1):  # dense, MoE
        kept: dict[int, int] = {}

        def pack(tensor: torch.Tensor, kept: dict[int, int] = kept) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.model.layers[index](x, rope, None)
        estimate = layer_bytes(config, index >= config.first_k_dense_replace, batch * seq, p=2)
        assert 0.98 < estimate / sum(kept.values()) <= 1.0


def test_cli_prints_the_tables_and_a_verdict(capsys):
    assert main(["--preset", "tiny-debug", "--device-memory", "1GiB", "--reserved", "0", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "activated per token" in out and "FITS" in out
    assert main(["--preset", "tiny-debug", "--device-memory", "1MB", "--dp", "2", "--ep", "4"]) == 1
    out = capsys.readouterr().out
    assert "mesh dp 2 x ep 4 = 8 ranks" in out and "DOES NOT FIT" in out


def test_cli_reads_a_config_json_and_rejects_bad_input(tmp_path, capsys):
    preset_config("tiny", vocab_size=500).save_pretrained(tmp_path)
    assert main(["--config", str(tmp_path / "config.json"), "--device-memory", "1GiB", "--reserved", "0"]) == 0
    assert main(["--config", str(tmp_path), "--vocab-size", "700", "--device-memory", "1GiB", "--reserved", "0"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        main(["--preset", "tiny-debug", "--ep", "3"])
    assert error.value.code == 2 and "ep=3 does not divide the 8 routed experts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing")])
    assert "neither a config.json" in capsys.readouterr().err
