"""FP8 training of the DeepSeek-V3 policy: which layers, numerics against a hand emulation, decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from r1kit.policy import DeepseekV3ForCausalLM, LatentCache
from r1kit.policy.attention import MultiheadLatentAttention
from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_linear import FP8Linear, fp8_linear
from r1kit.policy.fp8_policy import fp8_layer_names
from r1kit.policy.fp8_quant import quantize_blockwise
from r1kit.policy.moe import ExpertLayout, RoutedExperts, Router
from r1kit.policy.transformers_compat import CACHE_NAME

# A 16-wide block makes the tiny model's weights span several blocks and its activations several
# tiles, so block boundaries are exercised; the recipe is otherwise DeepSeek-V3's.
RECIPE = FP8Config(block_size=16, backend="emulated")


def rounded(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x rounded to E4M3 per block with the block formula (policy.fp8_quant) and dequantised."""
    return quantize_blockwise(x, block, amax_floor=RECIPE.amax_floor).dequantize()


class HandFP8Matmul(torch.autograd.Function):
    """y = x W^T, dx = dy W, dW = dy^T x, every operand rounded on its own tiles, written out by hand."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (M, K), (N, K) -> (M, N)
        ctx.save_for_backward(x, weight)
        bs = RECIPE.block_size
        return rounded(x, (1, bs)) @ rounded(weight, (bs, bs)).T

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        bs = RECIPE.block_size
        dx = rounded(dy, (1, bs)) @ rounded(weight, (bs, bs))  # tiles along N; the weight's own blocks
        dw = rounded(dy.T, (1, bs)) @ rounded(x.T, (1, bs)).T  # tiles along the tokens
        return dx, dw


class HandFP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert linear.bias is None
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = HandFP8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], -1)


def hand_expert_loop(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Rows sorted by expert, each expert's rows through HandFP8Matmul with its own weight."""
    outputs = []
    for e, rows in enumerate(x.split(layout.counts.tolist())):
        outputs.append(HandFP8Matmul.apply(rows, weight[e]) if len(rows) else rows.new_zeros(0, weight.shape[1]))
    return torch.cat(outputs)


def hand_emulated(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """A copy of the FP8 model whose FP8 layers are replaced by the hand emulation."""
    reference = copy.deepcopy(model)
    for name in fp8_layer_names(reference):
        module = reference.get_submodule(name)
        if isinstance(module, RoutedExperts):
            module.expert_linear = hand_expert_loop
        else:
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, HandFP8Linear(module))
    return reference


@pytest.fixture
def fp8_model(tiny_config, randomized) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(hidden_size=48, q_lora_rank=40, kv_lora_rank=40))
    randomized(model)
    model.enable_fp8(RECIPE)
    return model


def test_projections_and_experts_run_in_fp8_and_the_rest_stays_in_high_precision(tiny_config):
    plain = DeepseekV3ForCausalLM(tiny_config())  # layer 0 dense, layer 1 MoE, one MTP block (MoE)
    model = copy.deepcopy(plain)
    parameters = dict(model.named_parameters())
    model.enable_fp8(RECIPE)
    attention = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    swiglu = ("gate_proj", "up_proj", "down_proj")
    expected = [
        *(
            f"{layer}.self_attn.{name}"
            for layer in ("model.layers.0", "model.layers.1", "mtp.0.block")
            for name in attention
        ),
        *(f"model.layers.0.mlp.{name}" for name in swiglu),
        *(
            f"{layer}.mlp.{name}"
            for layer in ("model.layers.1", "mtp.0.block")
            for name in ("experts", *(f"shared_experts.{n}" for n in swiglu))
        ),
    ]
    assert sorted(fp8_layer_names(model)) == sorted(expected)
    assert type(model.lm_head) is nn.Linear and type(model.mtp[0].eh_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.gate, Router) and type(model.model.embed_tokens) is nn.Embedding
    # the same Parameter objects: optimizer state and state_dict keys are untouched
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert model.config.fp8 == {
        "block_size": 16,
        "amax_floor": 1e-12,
        "power_of_two_scales": False,
        "backend": "emulated",
        "dgrad_in_fp8": True,
        "wgrad_in_fp8": True,
    }


def test_config_flag_builds_the_model_in_fp8(tiny_config):
    model = DeepseekV3ForCausalLM(tiny_config(fp8=True))
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    assert model.model.layers[1].mlp.experts.fp8 == FP8Config()
    assert not fp8_layer_names(DeepseekV3ForCausalLM(tiny_config()))


def test_forward_and_backward_equal_a_hand_emulation_of_every_fp8_layer(fp8_model):
    fp8_model.train()
    reference = hand_emulated(fp8_model)
    ids = torch.randint(0, fp8_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, theirs = fp8_model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=0)
    ours.loss.backward()
    theirs.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in fp8_model.named_parameters():
        expected = reference_grads[name].grad
        torch.testing.assert_close(
            parameter.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name
        )


def test_the_fp8_model_differs_from_fp32_by_far_more_than_those_tolerances(fp8_model, tiny_config):
    plain = DeepseekV3ForCausalLM(tiny_config(hidden_size=48, q_lora_rank=40, kv_lora_rank=40))
    plain.load_state_dict(fp8_model.state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (fp8_model(ids).logits - plain(ids).logits).abs().max() > 1e-2


def decode_token_by_token(model: DeepseekV3ForCausalLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits (B, T, V) from a prefill of `prompt` tokens, then one token per step (absorbed attention)."""
    cache = LatentCache(model.config.num_hidden_layers)
    logits = [model(ids[:, :prompt], use_cache=True, **{CACHE_NAME: cache}).logits]
    for t in range(prompt, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache}).logits)
    return torch.cat(logits, dim=1)


@torch.no_grad()
def test_absorbed_decoding_reproduces_the_fp8_training_forward(fp8_model, monkeypatch):
    fp8_model.eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    expanded = fp8_model(ids).logits.log_softmax(-1)
    absorbed = decode_token_by_token(fp8_model, ids, prompt=5).log_softmax(-1)
    torch.testing.assert_close(absorbed, expanded, rtol=0, atol=5e-5)
    # decoding with the master weight of kv_b_proj and unrounded latents would not
    monkeypatch.setattr(MultiheadLatentAttention, "_absorbed_operands", lambda self, kv: (kv, self.kv_b_proj.weight))
    master = decode_token_by_token(fp8_model, ids, prompt=5).log_softmax(-1)
    assert (master - expanded).abs().max() > 1e-2


def looped_fp8_experts(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """One FP8 linear per expert over its rows (the reference for the grouped GEMM)."""
    rows = x.split(layout.counts.tolist())
    return torch.cat(
        [
            fp8_linear(r, w, None, RECIPE) if len(r) else r.new_zeros(0, w.shape[0])
            for r, w in zip(rows, weight, strict=True)
        ]
    )


def test_grouped_fp8_experts_equal_a_per_expert_fp8_loop(tiny_config):
    config = tiny_config(hidden_size=40, moe_intermediate_size=24)
    generator = torch.Generator().manual_seed(2)
    grouped = RoutedExperts(config)
    with torch.no_grad():
        grouped.gate_up_proj.copy_(0.3 * torch.randn(grouped.gate_up_proj.shape, generator=generator))
        grouped.down_proj.copy_(0.3 * torch.randn(grouped.down_proj.shape, generator=generator))
    grouped.fp8 = RECIPE
    looped = copy.deepcopy(grouped)
    looped.expert_linear = looped_fp8_experts
    # skewed routing: expert 0 takes most tokens, experts 5 and 6 none (tiles must not straddle experts)
    topk = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 7], [0, 4], [1, 0], [2, 0], [0, 1]] * 5)
    x = torch.randn(len(topk), 40, generator=generator)
    x[3] *= 1e4  # an outlier token: its tiles must not set other experts' scales
    gates = torch.rand(topk.shape, generator=generator)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [module(inputs, topk, gates) for module, inputs in zip((grouped, looped), xs, strict=True)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5 * outputs[1].abs().max().item())
    dy = torch.randn(outputs[0].shape, generator=generator)
    for out in outputs:
        out.backward(dy)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6 * xs[1].grad.abs().max().item())
    for name in ("gate_up_proj", "down_proj"):
        ours, theirs = getattr(grouped, name).grad, getattr(looped, name).grad
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item(), msg=name)
        assert theirs[5].abs().sum() == 0 and theirs[0].abs().sum() > 0
