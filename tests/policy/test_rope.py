"""RoPE and YaRN: frequencies and scales as transformers computes them, rotation as DeepSeek's reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

from r1kit.policy.rope import apply_rope, rope_frequencies, softmax_scale


@pytest.mark.parametrize("mscales", [(1.0, 1.0), (0.707, 1.0), (None, None)])
def test_yarn_frequencies_and_scales_match_transformers(tiny_config, yarn, mscales):
    yarn["mscale"], yarn["mscale_all_dim"] = mscales
    config = tiny_config(rope_parameters={k: v for k, v in yarn.items() if v is not None})
    inv_freq, attention_factor = rope_frequencies(config)
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    torch.testing.assert_close(inv_freq, expected_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor)
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    assert softmax_scale(config) == pytest.approx(yarn_apply_mscale(config.rope_parameters, qk_dim**-0.5))


def test_yarn_interpolates_low_frequencies_and_keeps_high_ones(tiny_config, yarn):
    config = tiny_config(rope_parameters=yarn)
    default, _ = rope_frequencies(tiny_config())
    scaled, _ = rope_frequencies(config)
    assert scaled[0] == default[0]  # fastest rotation: extrapolated, untouched
    assert scaled[-1] == pytest.approx(default[-1] / yarn["factor"])  # slowest: interpolated by the factor


def test_softmax_scale_grows_by_mscale_squared_under_yarn(tiny_config, yarn):
    base = softmax_scale(tiny_config())
    mscale = 0.1 * yarn["mscale_all_dim"] * math.log(yarn["factor"]) + 1
    assert softmax_scale(tiny_config(rope_parameters=yarn)) == pytest.approx(base * mscale**2)


def reference_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 inference/model.py: pairs (x0, x1), (x2, x3) as complex numbers times e^{i angle}."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * torch.polar(torch.ones_like(angles), angles).unsqueeze(-2)
    return torch.view_as_real(rotated).flatten(-2)


def test_interleaved_rope_is_the_reference_rotation_deinterleaved():
    x = torch.randn(2, 5, 3, 8)  # (B, T, heads, d)
    angles = torch.randn(2, 5, 4)  # (B, T, d/2)
    ours = apply_rope(x, angles.cos(), angles.sin(), interleaved=True)
    reference = reference_rotary(x, angles)
    torch.testing.assert_close(ours, torch.cat((reference[..., 0::2], reference[..., 1::2]), dim=-1))


def test_non_interleaved_rope_rotates_half_pairs():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(2, 5, 4)
    halves_as_pairs = torch.stack(x.chunk(2, dim=-1), dim=-1).flatten(-2)  # (x_j, x_{j + d/2}) pairs
    expected = reference_rotary(halves_as_pairs, angles)
    ours = apply_rope(x, angles.cos(), angles.sin(), interleaved=False)
    torch.testing.assert_close(ours, torch.cat((expected[..., 0::2], expected[..., 1::2]), dim=-1))
