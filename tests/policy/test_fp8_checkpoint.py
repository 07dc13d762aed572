import struct

import pytest
import torch
from torch import nn

from r1kit.policy.fp8_checkpoint import dequantize_fp8_state_dict, split_fp8_state_dict, weight_block_size
from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_linear import FrozenFP8Linear, convert_to_frozen_fp8
from r1kit.policy.fp8_quant import FP8_DTYPE, quantize_blockwise

DEEPSEEK_CONFIG = {
    "model_type": "deepseek_v3",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def released_checkpoint() -> dict[str, torch.Tensor]:
    """A miniature checkpoint in DeepSeek-V3's release format: FP8 projections with
    `weight_scale_inv`, everything else in BF16."""
    torch.manual_seed(1)
    w = torch.randn(200, 300) * 0.02
    q = quantize_blockwise(w, (128, 128), amax_floor=1e-4)
    return {
        "model.embed_tokens.weight": torch.randn(10, 300).bfloat16(),
        "model.layers.0.self_attn.q_a_proj.weight": q.data,
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": q.scale,
        "model.layers.0.input_layernorm.weight": torch.ones(300).bfloat16(),
    }


def test_dequantisation_matches_the_block_formula_bit_for_bit():
    state = released_checkpoint()
    data = state["model.layers.0.self_attn.q_a_proj.weight"]
    scale = state["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    out = dequantize_fp8_state_dict(state, dtype=torch.float32)
    q_values, s_values = data.float().tolist(), scale.tolist()
    expected = [
        [struct.unpack("f", struct.pack("f", q_values[i][j] * s_values[i // 128][j // 128]))[0] for j in range(300)]
        for i in range(200)
    ]
    assert torch.equal(out["model.layers.0.self_attn.q_a_proj.weight"], torch.tensor(expected))


def test_dequantised_state_dict_drops_scales_and_passes_other_tensors_through():
    state = released_checkpoint()
    out = dequantize_fp8_state_dict(state)
    assert list(out) == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.input_layernorm.weight",
    ]
    assert out["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    assert out["model.embed_tokens.weight"] is state["model.embed_tokens.weight"]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda s: s.pop("model.layers.0.self_attn.q_a_proj.weight_scale_inv"), KeyError, "has no scale"),
        (
            lambda s: s.pop("model.layers.0.self_attn.q_a_proj.weight"),
            KeyError,
            "has no float8_e4m3fn weight",
        ),
        (
            lambda s: s.update({"model.layers.0.self_attn.q_a_proj.weight_scale_inv": torch.ones(2, 2)}),
            ValueError,
            r"has shape \(2, 2\).*needs a float tensor of shape \(2, 3\)",
        ),
        (
            lambda s: s.update({"x.weight": torch.zeros(2, 2, dtype=torch.float8_e5m2)}),
            TypeError,
            "'x.weight' is",
        ),
    ],
)
def test_malformed_checkpoints_raise_errors_naming_the_key(edit, error, message):
    state = released_checkpoint()
    edit(state)
    with pytest.raises(error, match=message):
        dequantize_fp8_state_dict(state)


def test_block_size_is_read_from_the_model_config():
    assert weight_block_size(DEEPSEEK_CONFIG) == (128, 128)
    assert weight_block_size({"model_type": "llama"}) is None
    with pytest.raises(ValueError, match="quant_method"):
        weight_block_size({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="weight_block_size must be two positive ints"):
        weight_block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}})


class TinyDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 300)
        self.q_a_proj = nn.Linear(300, 200, bias=False)
        self.input_layernorm = nn.RMSNorm(300)


def test_checkpoint_kept_in_fp8_loads_into_frozen_layers():
    state = {
        key.replace("model.layers.0.self_attn.", "").replace("model.layers.0.", "").replace("model.", ""): t
        for key, t in released_checkpoint().items()
    }
    plain, fp8_weights = split_fp8_state_dict(state, block=weight_block_size(DEEPSEEK_CONFIG))
    model = TinyDecoderLayer().bfloat16()
    result = model.load_state_dict(plain, strict=False)
    assert result.missing_keys == ["q_a_proj.weight"] and not result.unexpected_keys
    convert_to_frozen_fp8(model, fp8_weights, FP8Config())
    assert isinstance(model.q_a_proj, FrozenFP8Linear)
    assert model.q_a_proj.weight.dtype == FP8_DTYPE
    assert torch.equal(model.q_a_proj.weight_scale_inv, state["q_a_proj.weight_scale_inv"])
    # A frozen FP8 layer reads its state_dict back in the release format.
    assert set(model.q_a_proj.state_dict()) == {"weight", "weight_scale_inv"}

    x = torch.randn(4, 300)
    y = model.q_a_proj(x)
    x_q = quantize_blockwise(x, (1, 128), amax_floor=FP8Config().amax_floor).dequantize()
    expected = x_q @ fp8_weights["q_a_proj.weight"].dequantize().t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
