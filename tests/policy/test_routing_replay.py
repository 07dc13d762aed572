"""Keep routing in the model: replayed experts are the ones used, gates still come from the router."""

import pytest
import torch

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.moe import Router


@pytest.fixture
def model() -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM(preset_config("tiny-debug"))


def random_routing(config, layers: int, batch: int, seq: int) -> torch.Tensor:
    """(layers, batch, seq, K) distinct experts per token."""
    scores = torch.rand(layers, batch, seq, config.n_routed_experts)
    return scores.topk(config.num_experts_per_tok, dim=-1).indices.to(torch.int16)


def test_replayed_experts_are_used_and_reported(model) -> None:
    config, ids = model.config, torch.randint(2, 100, (2, 9))
    chosen = model(ids, output_routed_experts=True).routed_experts
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert chosen.shape == (moe_layers, 2, 9, config.num_experts_per_tok) and chosen.dtype == torch.int16
    replay = random_routing(config, moe_layers, 2, 9)
    replay[:, :, 4:] = -1  # the routers choose for these tokens
    used = model(ids, routed_experts=replay, output_routed_experts=True).routed_experts
    assert torch.equal(used[:, :, :4], replay[:, :, :4])
    assert moe_layers == 1  # the one MoE layer is the last: its input does not depend on its own routing
    assert torch.equal(used[:, :, 4:], chosen[:, :, 4:])
    with pytest.raises(ValueError, match="num_moe_layers"):
        model(ids, routed_experts=replay[:, :1])


def test_replaying_its_own_choice_changes_nothing(model) -> None:
    ids = torch.randint(2, 100, (3, 7))
    out = model(ids, output_routed_experts=True)
    replayed = model(ids, routed_experts=out.routed_experts)
    torch.testing.assert_close(replayed.logits, out.logits, rtol=0, atol=0)


def test_gates_come_from_the_current_router_over_the_replayed_experts() -> None:
    config = preset_config("tiny-debug")
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, config.hidden_size, requires_grad=True)
    replay = random_routing(config, 1, 1, 5)[0, 0]
    scores, used, gates = router(x, replay)
    assert torch.equal(used, replay.long())
    expected = scores.gather(1, used)
    expected = expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor
    torch.testing.assert_close(gates, expected)
    gates.sum().backward()  # the router keeps learning under replay
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_the_bias_update_counts_the_replayed_selection(model) -> None:
    config, ids = model.config, torch.randint(2, 100, (2, 6))
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    replay = torch.zeros(moe_layers, 2, 6, config.num_experts_per_tok, dtype=torch.int16)
    replay[..., 1] = 3  # every token to experts 0 and 3
    model.train()
    model(ids, routed_experts=replay)
    expected = torch.zeros(config.n_routed_experts)
    expected[[0, 3]] = 12.0
    load = model.routing_load()[:moe_layers]
    assert torch.equal(load, expected.expand_as(load))
