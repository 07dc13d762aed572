"""LoRA weight sync: the engine gets base + delta, and the frozen base (the KL reference) never moves."""

import copy

import torch
from peft import LoraConfig, get_peft_model

from r1kit.grpo.adapters import DEEPSEEK_V3_LORA_TARGETS, engine_weights


def bf16_lora(policy):
    model = get_peft_model(copy.deepcopy(policy).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=DEEPSEEK_V3_LORA_TARGETS))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a trained adapter: B away from its zero init
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def test_syncs_leave_the_bf16_base_exactly_as_it_was(debug_policy):
    model = bf16_lora(debug_policy)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items() if "lora_" not in name}
    for _ in range(100):
        synced = dict(engine_weights(model))
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in base.items())
    layer = model.base_model.model.model.layers[0].self_attn.q_a_proj
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert torch.equal(synced["model.layers.0.self_attn.q_a_proj.weight"], expected)
    assert set(synced) == set(debug_policy.state_dict())


def test_synced_weights_are_what_merging_gives(debug_policy):
    model = bf16_lora(debug_policy).float()
    synced = {name: tensor.clone() for name, tensor in engine_weights(model)}
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(synced) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(synced[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
