"""FP8 grouped GEMM for routed experts: y[t] = x[t] @ W[e(t)]^T for tokens sorted by expert.

Inputs are the usual MoE dispatch layout: x (T, K) with the rows of expert 0 first, then
expert 1, ...; weight (E, N, K); tokens_per_expert (E,) summing to T. The three GEMMs use the
dense recipe of fp8_linear.py, expert by expert:

    GEMM    computes                a (1 x 128 tiles along)   b
    Fprop   y_e   = x_e W_e^T       x_e   (K)                 W_e   128 x 128 blocks of expert e
    Dgrad   dx_e  = dy_e W_e        dy_e  (N)                 W_e^T the same blocks, transposed
    Wgrad   dW_e  = dy_e^T x_e      dy_e^T (tokens of e)      x_e^T 1 x 128 tiles (tokens of e)

Wgrad tiles run along the tokens of one expert: they start at the expert's first token and
never straddle two experts; the last tile of an expert may be partial. A backward GEMM that
`FP8Config` keeps out of FP8 (`dgrad_in_fp8` / `wgrad_in_fp8` False) runs as a plain batched
matmul over the zero-padded (E, T_max, .) layout below.

Emulation, with no Python loop over experts: the rows are scattered into a zero-filled batch
(E, T_max, .) with T_max the largest expert load, the GEMMs run as batched matmuls and the rows
are gathered back. Padding rows are zero, so they add nothing to a product and never raise a
tile's amax: the tiles and scales are exactly those of each expert taken alone.

CUDA: torch has no block-scaled grouped GEMM (as of torch 2.11, `scaled_grouped_mm` accepts
row-wise and MX/NV scales only), so the fast path loops over the non-empty experts and runs the
dense block-scaled kernel on each slice: one launch per expert and GEMM, after one host sync
to read the counts. A fused kernel (e.g. DeepGEMM's grouped FP8 GEMM) would remove the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from r1kit.policy.fp8_gemm import (
    FP8Config,
    activation_mm,
    gemm_output_dtype,
    high_precision_mm,
    quantize_weight,
    select_backend,
    weight_grad_mm,
)
from r1kit.policy.fp8_quant import BlockQuantized


@dataclass(frozen=True)
class ExpertSegments:
    """Where each row of an expert-sorted token batch lives.

    counts: tokens of each expert; expert: (T,) expert of each row; slot: (T,) index of each row
    within its expert.
    """

    counts: tuple[int, ...]
    expert: Tensor
    slot: Tensor

    @classmethod
    def from_counts(cls, tokens_per_expert: Tensor, num_rows: int) -> ExpertSegments:
        """Layout of `num_rows` rows sorted by expert, `tokens_per_expert` (E,) of them per expert."""
        if tokens_per_expert.dim() != 1 or tokens_per_expert.is_floating_point():
            raise ValueError(
                f"tokens_per_expert must be a 1-D integer tensor, got {tokens_per_expert.dtype} "
                f"of shape {tuple(tokens_per_expert.shape)}"
            )
        counts = tuple(int(c) for c in tokens_per_expert.tolist())  # one host sync
        if min(counts, default=0) < 0 or sum(counts) != num_rows:
            raise ValueError(f"tokens_per_expert {counts} must be non-negative and sum to {num_rows} rows")
        device = tokens_per_expert.device
        sizes = torch.tensor(counts, device=device)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(num_rows, device=device) - starts[expert]
        return cls(counts, expert, slot)

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, first row, end row) of every expert that received tokens."""
        bounds, start = [], 0
        for e, count in enumerate(self.counts):
            if count:
                bounds.append((e, start, start + count))
            start += count
        return bounds

    def to_padded(self, rows: Tensor) -> Tensor:
        """(T, C) -> (E, T_max, C): expert e's rows first in batch e, zeros after them."""
        padded = rows.new_zeros(len(self.counts), max(self.counts, default=0), rows.shape[-1])
        padded[self.expert, self.slot] = rows
        return padded

    def from_padded(self, padded: Tensor) -> Tensor:
        """(E, T_max, C) -> (T, C), the inverse of `to_padded`."""
        return padded[self.expert, self.slot]


def _expert_rows_mm(
    rows: Tensor,
    w: BlockQuantized,
    layout: ExpertSegments,
    config: FP8Config,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """rows (T, K) sorted by expert, each times w[e]^T of its expert e; w (E, N, K) -> (T, N)."""
    if backend == "cuda":
        out = rows.new_zeros(rows.shape[0], w.data.shape[-2], dtype=out_dtype)
        for e, start, end in layout.segments():
            w_e = BlockQuantized(w.data[e], w.scale[e], w.block)
            out[start:end] = activation_mm(rows[start:end], w_e, config, out_dtype, backend)
        return out
    return layout.from_padded(activation_mm(layout.to_padded(rows), w, config, out_dtype, backend))


def _expert_weight_grad(dy: Tensor, x: Tensor, layout: ExpertSegments, config: FP8Config, backend: str) -> Tensor:
    """dW_e = dy_e^T x_e for every expert in float32: dy (T, N), x (T, K) -> (E, N, K)."""
    if backend == "cuda":
        grad = dy.new_zeros(len(layout.counts), dy.shape[-1], x.shape[-1], dtype=torch.float32)
        for e, start, end in layout.segments():
            grad[e] = weight_grad_mm(dy[start:end], x[start:end], config, backend)
        return grad
    return weight_grad_mm(layout.to_padded(dy), layout.to_padded(x), config, backend)


class _FP8GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, tokens_per_expert: Tensor, config: FP8Config) -> Tensor:
        layout = ExpertSegments.from_counts(tokens_per_expert, x.shape[0])
        out_dtype, backend = gemm_output_dtype(x), select_backend(config, x.device)
        with torch.autocast(x.device.type, enabled=False):
            y = _expert_rows_mm(x, quantize_weight(weight, config), layout, config, out_dtype, backend)
        ctx.save_for_backward(x, weight)
        ctx.layout, ctx.config, ctx.backend, ctx.compute_dtype = layout, config, backend, out_dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        layout, config, backend, compute = ctx.layout, ctx.config, ctx.backend, ctx.compute_dtype
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if config.dgrad_in_fp8:
                    w_t = quantize_weight(weight, config).transpose()  # (E, K, N)
                    dx = _expert_rows_mm(dy, w_t, layout, config, x.dtype, backend)
                else:  # (E, T_max, N) @ (E, K, N)^T
                    padded = high_precision_mm(layout.to_padded(dy), weight.transpose(-2, -1), compute, x.dtype)
                    dx = layout.from_padded(padded)
            if ctx.needs_input_grad[1]:
                if config.wgrad_in_fp8:
                    dw = _expert_weight_grad(dy, x, layout, config, backend).to(weight.dtype)
                else:  # (E, N, T_max) @ (E, K, T_max)^T
                    dy_t, x_t = layout.to_padded(dy).transpose(-2, -1), layout.to_padded(x).transpose(-2, -1)
                    dw = high_precision_mm(dy_t, x_t, compute, weight.dtype)
        return dx, dw, None, None


def fp8_grouped_linear(x: Tensor, weight: Tensor, tokens_per_expert: Tensor, config: FP8Config) -> Tensor:
    """Routed-expert GEMM y[t] = x[t] @ weight[e(t)]^T with all three GEMMs in block-scaled FP8.

    x (T, K) rows sorted by expert, weight (E, N, K), tokens_per_expert (E,) integers summing
    to T -> (T, N) in x's dtype (the autocast dtype under autocast). Reads the counts on the host.
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"expected x (T, K) and weight (E, N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if tokens_per_expert.shape != (weight.shape[0],):
        raise ValueError(f"tokens_per_expert has shape {tuple(tokens_per_expert.shape)}, expected ({weight.shape[0]},)")
    return _FP8GroupedLinearFunction.apply(x, weight, tokens_per_expert, config)


__all__ = ["ExpertSegments", "fp8_grouped_linear"]
