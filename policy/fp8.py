"""FP8 mixed-precision training with DeepSeek-V3's fine-grained block scaling (public API).

Recipe (DeepSeek-V3 technical report, Section 3.3): the three GEMMs of every converted linear
layer and routed expert (Fprop, Dgrad, Wgrad) take E4M3 operands; activations and gradients
are scaled per 1 x 128 tile along the reduction dimension, weights per 128 x 128 block, each
with its own float32 scale amax / 448 (floored, optionally a power of two); products accumulate
in float32. Master weights, gradients and optimizer state stay in the parameters' dtype, and
the embedding, output head, router, norms and attention core stay in higher precision.
`FP8Config(dgrad_in_fp8=False, wgrad_in_fp8=False)` keeps the backward GEMMs out of FP8
(docs/fp8.md measures what that buys on a small model).

Where each part lives:
    fp8_quant.py       block quantisation numerics (pure functions)
    fp8_gemm.py        FP8Config, the block-scaled GEMM and its CUDA / emulated back ends
    fp8_linear.py      FP8Linear, FrozenFP8Linear, convert_to_fp8, convert_to_frozen_fp8
    fp8_grouped.py     fp8_grouped_linear for routed experts
    fp8_checkpoint.py  DeepSeek-V3 `weight_scale_inv` checkpoints
    fp8_policy.py      which parts of our DeepSeek-V3 policy run in FP8, `enable_fp8`

Typical use:
    model.enable_fp8(FP8Config())            # our policy (or config.fp8 / load_policy(..., fp8=True))
    convert_to_fp8(model, FP8Config())       # any other model's projections
    y = fp8_grouped_linear(x_sorted, w_experts, tokens_per_expert, config)   # experts
"""

from r1kit.policy.fp8_checkpoint import (
    dequantize_fp8_state_dict,
    dequantize_fp8_tensors,
    split_fp8_state_dict,
    weight_block_size,
)
from r1kit.policy.fp8_gemm import FP8Config, cuda_block_scaled_mm_available
from r1kit.policy.fp8_grouped import fp8_grouped_linear
from r1kit.policy.fp8_linear import (
    DEFAULT_SKIP_PATTERNS,
    FP8Linear,
    FrozenFP8Linear,
    convert_to_fp8,
    convert_to_frozen_fp8,
    fp8_linear,
)
from r1kit.policy.fp8_quant import BlockQuantized, dequantize_blockwise, quantize_blockwise, quantize_tensorwise

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "BlockQuantized",
    "FP8Config",
    "FP8Linear",
    "FrozenFP8Linear",
    "convert_to_fp8",
    "convert_to_frozen_fp8",
    "cuda_block_scaled_mm_available",
    "dequantize_blockwise",
    "dequantize_fp8_state_dict",
    "dequantize_fp8_tensors",
    "fp8_grouped_linear",
    "fp8_linear",
    "quantize_blockwise",
    "quantize_tensorwise",
    "split_fp8_state_dict",
    "weight_block_size",
]
