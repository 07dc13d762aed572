"""The two small blocks every other module uses: RMSNorm and the SwiGLU feed-forward.

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)      computed in fp32, cast back
    MLP(x)     = W_down (act(W_gate x) * W_up x)    act = SiLU for DeepSeek-V3

The MLP's three projections are plain `nn.Linear`, the modules an FP8 recipe
swaps for its own linear layer (dense layers and shared experts run in FP8 in
DeepSeek-V3).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward (hidden -> intermediate -> hidden), used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
