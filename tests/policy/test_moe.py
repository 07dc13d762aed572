"""DeepSeekMoE: routing as in transformers and the paper, grouped == looped experts, balancing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as TransformersMoE
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.attention import PackedSequences
from r1kit.policy.moe import (
    MoE,
    RoutedExperts,
    Router,
    group_limited_topk,
    padded_bmm_linear,
    routing_bias_update,
    sequence_balance_loss,
)


def brute_force_topk(scores: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> list[set[int]]:
    """Per token: the best `top_k` experts of the best `topk_group` groups (group score: top-2 sum)."""
    per_group = scores.shape[1] // n_group
    chosen = []
    for row in scores.tolist():
        groups = [row[g * per_group : (g + 1) * per_group] for g in range(n_group)]
        group_score = [sum(sorted(group)[-2:]) for group in groups]
        kept = sorted(range(n_group), key=lambda g: group_score[g])[-topk_group:]
        allowed = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        chosen.append(set(sorted(allowed, key=lambda e: row[e])[-top_k:]))
    return chosen


@pytest.mark.parametrize(("n_group", "topk_group", "top_k"), [(4, 2, 2), (4, 1, 2), (2, 1, 3), (1, 1, 4)])
def test_group_limited_topk_matches_brute_force(n_group, topk_group, top_k):
    scores = torch.rand(64, 8)
    chosen = group_limited_topk(scores, n_group, topk_group, top_k)
    assert [set(row) for row in chosen.tolist()] == brute_force_topk(scores, n_group, topk_group, top_k)


def test_router_matches_transformers_router(tiny_config, randomized):
    config = tiny_config()
    router = Router(config)
    randomized(router)
    theirs = DeepseekV3TopkRouter(copy.deepcopy(config))
    theirs.load_state_dict(router.state_dict())
    x = torch.randn(50, config.hidden_size)
    scores, idx, gates = router(x)
    _, their_gates, their_idx = theirs(x)
    order, their_order = idx.argsort(-1), their_idx.argsort(-1)
    assert idx.gather(1, order).equal(their_idx.gather(1, their_order))
    torch.testing.assert_close(gates.gather(1, order), their_gates.gather(1, their_order))
    torch.testing.assert_close(scores, F.linear(x, router.weight).sigmoid())


def test_bias_steers_selection_but_not_gate_values(tiny_config):
    config = tiny_config(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, config.hidden_size)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 100.0  # expert 3 always chosen
    scores, idx, gates = router(x)
    assert (idx == 3).any(dim=1).all()
    torch.testing.assert_close(gates, scores.gather(1, idx))  # gates are the unbiased affinities


def looped_experts(experts: RoutedExperts, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Reference: every expert applied to its tokens one at a time."""
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            expert = idx[token, slot]
            gate, up = (experts.gate_up_proj[expert] @ x[token]).chunk(2)
            out[token] = out[token] + gates[token, slot] * (experts.down_proj[expert] @ (F.silu(gate) * up))
    return out


class PaddedBmmExperts(RoutedExperts):
    def expert_linear(self, x, weight, layout):
        return padded_bmm_linear(x, weight, layout)


@pytest.mark.parametrize("experts_class", [RoutedExperts, PaddedBmmExperts])
def test_grouped_dispatch_equals_per_expert_loop(tiny_config, experts_class):
    config = tiny_config()
    experts = experts_class(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(24, config.hidden_size, requires_grad=True)
    idx = torch.randint(0, 5, (24, 2))  # experts 5..7 receive nothing
    idx[:, 1] = (idx[:, 0] + 1) % 5
    gates = torch.rand(24, 2, requires_grad=True)
    grouped = experts(x, idx, gates)
    grouped.square().sum().backward()
    grads = [t.grad.clone() for t in (x, gates, experts.gate_up_proj, experts.down_proj)]
    for t in (x, gates, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    looped = looped_experts(experts, x, idx, gates)
    looped.square().sum().backward()
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, (x, gates, experts.gate_up_proj, experts.down_proj), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_moe_layer_matches_transformers_moe(tiny_config, randomized):
    config = tiny_config()
    ours = MoE(config).eval()
    randomized(ours)
    theirs = TransformersMoE(copy.deepcopy(config)).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).hidden, theirs(x), rtol=1e-5, atol=1e-5)


def paper_balance_loss(scores, chosen, token_mask, top_k):
    """Eqs. 17-20 of the DeepSeek-V3 report, one sequence at a time, averaged over sequences."""
    num_experts = scores.shape[-1]
    losses = []
    for b in range(scores.shape[0]):
        tokens = [t for t in range(scores.shape[1]) if token_mask[b, t]]
        total = 0.0
        for i in range(num_experts):
            f_i = num_experts / (top_k * len(tokens)) * sum(int(i in chosen[b, t].tolist()) for t in tokens)
            p_i = sum(scores[b, t, i] / scores[b, t].sum() for t in tokens) / len(tokens)
            total = total + f_i * p_i
        losses.append(total)
    return sum(losses) / len(losses)


def test_sequence_balance_loss_equals_the_papers_formula():
    scores = torch.rand(3, 6, 8)
    chosen = torch.stack([torch.randperm(8)[:2] for _ in range(18)]).view(3, 6, 2)
    token_mask = torch.ones(3, 6, dtype=torch.bool)
    token_mask[1, :2] = False  # left padding is not part of the sequence
    expected = paper_balance_loss(scores, chosen, token_mask, top_k=2)
    torch.testing.assert_close(sequence_balance_loss(scores, chosen, token_mask), torch.as_tensor(expected))


def test_per_sequence_balance_loss_is_the_per_row_one_with_one_sequence_per_row():
    """Left and right padding numbered as the GRPO batch numbers it (cumsum positions) split nothing real."""
    scores = torch.rand(3, 6, 8)
    chosen = torch.stack([torch.randperm(8)[:2] for _ in range(18)]).view(3, 6, 2)
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    positions = (token_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    per_row = sequence_balance_loss(scores, chosen, token_mask)
    sequences = PackedSequences.from_positions(positions, token_mask)
    per_sequence = sequence_balance_loss(scores, chosen, token_mask, sequences)
    torch.testing.assert_close(per_sequence, per_row)
    torch.testing.assert_close(per_row, torch.as_tensor(paper_balance_loss(scores, chosen, token_mask, top_k=2)))


def test_a_packed_row_is_balanced_sample_by_sample():
    """One row holding samples of 5, 3 and 4 tokens, then 2 of padding: the mean over the samples as rows."""
    lengths = (5, 3, 4)
    scores = torch.rand(1, 14, 8, requires_grad=True)
    chosen = torch.stack([torch.randperm(8)[:2] for _ in range(14)]).view(1, 14, 2)
    token_mask = (torch.arange(14) < sum(lengths)).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in (*lengths, 2)]).unsqueeze(0)
    packed = sequence_balance_loss(scores, chosen, token_mask, PackedSequences.from_positions(positions, token_mask))
    separate = torch.zeros(3, 5, 8)
    separate_chosen = torch.zeros(3, 5, 2, dtype=torch.long)
    separate_mask = torch.zeros(3, 5, dtype=torch.bool)
    for row, (start, n) in enumerate(zip((0, 5, 8), lengths, strict=True)):
        separate[row, :n] = scores[0, start : start + n].detach()
        separate_chosen[row, :n] = chosen[0, start : start + n]
        separate_mask[row, :n] = True
    expected = paper_balance_loss(separate, separate_chosen, separate_mask, top_k=2)
    torch.testing.assert_close(packed, torch.as_tensor(expected), check_dtype=False)
    assert not torch.isclose(sequence_balance_loss(scores, chosen, token_mask), packed)  # the row as one sequence
    packed.backward()
    assert scores.grad[0, :12].abs().sum() > 0 and not scores.grad[0, 12:].any()  # padding gets no gradient


def test_balance_loss_is_one_for_perfect_balance():
    # uniform affinities and each expert chosen equally often: sum_i f_i P_i = sum_i 1 * 1/N = 1
    scores = torch.full((1, 4, 4), 0.5)
    chosen = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    torch.testing.assert_close(sequence_balance_loss(scores, chosen), torch.tensor(1.0))


def test_aux_loss_only_in_training_weighted_by_alpha_with_gradient_to_the_router(tiny_config):
    layer = MoE(tiny_config(seq_balance_alpha=0.5))
    torch.nn.init.normal_(layer.gate.weight)
    x = torch.randn(2, 5, layer.gate.weight.shape[1])
    out = layer.train()(x)
    scores, idx, _ = layer.gate(x.view(10, -1))
    expected = 0.5 * sequence_balance_loss(scores.view(2, 5, -1), idx.view(2, 5, -1))
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.eval()(x).aux_loss is None
    assert MoE(tiny_config(seq_balance_alpha=0.0)).train()(x).aux_loss is None


def test_routing_bias_update_is_the_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6
    torch.testing.assert_close(routing_bias_update(bias, load, 0.1), torch.tensor([-0.1, 0.6, -0.5, 0.0]))


def test_bias_is_an_fp32_buffer_outside_the_optimizer(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config()).to(torch.bfloat16)
    router = model.routers()[0]
    assert router.e_score_correction_bias.dtype == router.expert_load.dtype == torch.float32
    assert router.weight.dtype == torch.bfloat16
    assert not router.e_score_correction_bias.requires_grad
    assert all(p is not router.e_score_correction_bias for p in model.parameters())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    assert "model.layers.1.mlp.gate.expert_load" not in model.state_dict()


def test_bias_keeps_its_fp32_values_through_a_cast(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config())
    randomized(model)
    biases = [router.e_score_correction_bias.clone() for router in model.routers()]
    model.to(torch.bfloat16)
    for router, bias in zip(model.routers(), biases, strict=True):
        assert torch.equal(router.e_score_correction_bias, bias)  # not rounded through bf16


def test_the_policy_builds_on_the_meta_device_and_materialises_with_to_empty(tiny_config, randomized):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(tiny_config())
    assert all(tensor.is_meta for tensor in model.state_dict().values())
    model.to_empty(device="cpu")
    model.init_buffers()
    source = DeepseekV3ForCausalLM(tiny_config())
    randomized(source)
    model.load_state_dict(source.state_dict())
    for router in model.routers():
        assert router.e_score_correction_bias.dtype == router.expert_load.dtype == torch.float32
        assert router.expert_load.device.type == "cpu" and not router.expert_load.any()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, source.eval()(ids).logits, rtol=0, atol=0)


def test_loads_accumulate_over_micro_batches_and_update_once(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config(router_bias_update_speed=0.01)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # padding is not counted
    for _ in range(2):  # two micro-batches of one optimizer step
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    load = model.routing_load()
    real_tokens, top_k = 10, 2
    assert load.shape == (2, 8)  # main MoE layer + MTP block
    assert load[0].sum() == 2 * real_tokens * top_k
    optimizer.step()
    assert not model.routers()[0].e_score_correction_bias.any()  # the optimizer never moves it
    used = model.update_routing_bias()
    assert used.equal(load) and not model.routing_load().any()
    bias = model.routers()[0].e_score_correction_bias
    torch.testing.assert_close(bias, 0.01 * torch.sign(load[0].mean() - load[0]))


def test_no_counts_in_eval_or_without_gradients(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config())
    ids = torch.randint(0, 128, (2, 6))
    model.eval()(ids)
    with torch.no_grad():
        model.train()(ids)
    assert not model.routing_load().any()


def test_update_routing_bias_checks_the_load_shape(tiny_config):
    with pytest.raises(ValueError, match="num_moe_layers"):
        DeepseekV3ForCausalLM(tiny_config()).update_routing_bias(torch.zeros(3, 8))


def test_bias_update_balances_a_skewed_router(tiny_config):
    config = tiny_config(n_group=1, topk_group=1, router_bias_update_speed=0.01)
    router = Router(config)
    with torch.no_grad():
        torch.nn.init.normal_(router.weight, std=0.5)
        router.weight[:, 0] = torch.linspace(2.0, -2.0, 8)  # a constant feature favours the low experts
    x = torch.randn(512, config.hidden_size)
    x[:, 0] = 1.0

    def load() -> torch.Tensor:
        return torch.bincount(router(x)[1].flatten(), minlength=8).float()

    before = load()
    for _ in range(40):
        router.update_bias(load(), config.router_bias_update_speed)
    after = load()
    imbalance = lambda counts: (counts.max() / counts.mean()).item()
    assert imbalance(before) > 1.8 and imbalance(after) < 1.15, (before, after)
    assert after.min() > 3 * before.min()


def test_layer_load_counts_real_tokens_only(tiny_config):
    layer = MoE(tiny_config()).train()
    torch.nn.init.normal_(layer.gate.weight)
    token_mask = torch.tensor([[False, True, True], [True, True, True]])
    out = layer(torch.randn(2, 3, layer.gate.weight.shape[1]), token_mask)
    assert out.load.shape == (8,) and out.load.sum() == 5 * 2  # 5 real tokens, top-2
