"""Rotary position embedding for MLA's decoupled rope dimensions: default RoPE and YaRN.

Only the `qk_rope_head_dim` part of every query head and the one shared rope
key are rotated. Frequencies:

    default:  inv_freq_j = theta^(-2j / d)                        j = 0 .. d/2 - 1
    YaRN:     inv_freq_j = inv_freq_j / s * (1 - m_j) + inv_freq_j * m_j
              with s = factor and m_j = 1 - ramp(j; low, high), the linear ramp
              between the correction dimensions of beta_fast and beta_slow
              rotations over original_max_position_embeddings (floor/ceil when
              `truncate`, the DeepSeek default).

YaRN's attention correction comes in two places, as in DeepSeek-V3 and
transformers:
    cos/sin are multiplied by attention_factor = mscale(s, mscale) / mscale(s, mscale_all_dim)
    (1.0 for the released config), and the softmax scale becomes
    qk_head_dim^-0.5 * mscale(s, mscale_all_dim)^2, with mscale(s, m) = 0.1 m ln s + 1.

Layout: with `rope_interleave` (the released checkpoints) the rotated pairs are
(x0, x1), (x2, x3), ...; otherwise (x_j, x_{j + d/2}). Both return the rotated
vector de-interleaved as [x_even', x_odd'] (a fixed permutation applied to
queries and keys alike, so q.k is unchanged); the rope keys in the latent cache
are stored in that layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r1kit.policy.config import DeepseekV3Config


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim // 2,) fp32 and the cos/sin attention factor."""
    rope = config.rope_parameters
    dim, base = config.qk_rope_head_dim, float(rope["rope_theta"])
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (d/2,)
    if rope.get("rope_type", "default") == "default":
        return inv_freq, 1.0

    factor = float(rope["factor"])
    original_len = rope["original_max_position_embeddings"]
    low, high = _yarn_correction_range(
        rope.get("beta_fast") or 32,
        rope.get("beta_slow") or 1,
        dim,
        base,
        original_len,
        truncate=rope.get("truncate", True),
    )
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def _yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int, truncate: bool
) -> tuple[float, float]:
    """The rope dimensions where `beta_fast` and `beta_slow` full rotations fit in `original_len` tokens."""

    def dimension_of(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def softmax_scale(config: DeepseekV3Config) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope["factor"]), rope["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables every MLA layer shares for one forward."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)  # (d/2,) fp32

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, d/2) in `dtype`, scaled by the attention factor."""
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, d/2)
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x (B, T, heads, d) by cos/sin (B, T, d/2); returns (B, T, heads, d) as [even', odd']."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B, T, 1, d/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
