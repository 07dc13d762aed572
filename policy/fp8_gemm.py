"""Block-scaled FP8 GEMM `a @ b^T` with two back ends, and the recipe configuration.

Every GEMM of the FP8 recipe is written in one canonical form, out = a @ b^T, where
a (M, K) is quantised in 1 x 128 tiles along K and b (N, K) either in 128 x 128 blocks
(a weight) or in 1 x 128 tiles along K (an activation, in the weight-gradient GEMM):

    out[m, n] = sum_k  q_a[m, k] * s_a[m, k // 128] * q_b[n, k] * s_b[block of (n, k)]

Back ends, chosen per call by `select_backend`:
- "emulated" (any device): dequantise both operands to float32 with their scales and multiply
  in float32. The quantised values and scales are the ones the CUDA path consumes, so the
  emulation reproduces the FP8 numerics exactly; only the fp32 summation order differs.
- "cuda": `torch.nn.functional.scaled_mm` with ScalingType.BlockWise1x128 / BlockWise128x128,
  which dispatches to cuBLASLt's block-scaled FP8 kernels (the DeepSeek recipe, SM90 only,
  cuBLAS >= 12.9, public API since torch 2.10). Accumulation is FP32 with the scales applied
  per 128-wide K block (use_fast_accum=False). The reduction dimension is zero-padded to a
  multiple of 128 and the other dimensions to a multiple of 16; zeros add nothing.
No Triton is imported anywhere, so CPU machines never need it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from r1kit.policy.fp8_quant import BlockQuantized, quantize_blockwise

BACKENDS = ("auto", "emulated", "cuda")
CUDA_BLOCK = 128  # the only block size cuBLASLt's DeepSeek-style kernels accept
MIN_CUBLAS = (12, 9)


@dataclass(frozen=True)
class FP8Config:
    """The FP8 recipe of every converted GEMM and the back end that runs it.

    block_size: length of an activation tile (1 x block_size, along the reduction dim) and side
        of a weight block (block_size x block_size). DeepSeek-V3 and the CUDA kernels use 128.
    amax_floor: lower bound on a block's amax before scale = amax / 448; keeps all-zero blocks
        finite. 1e-12 as in torchao; DeepSeek's inference kernels use 1e-4 (see fp8_quant.py).
    power_of_two_scales: round every scale up to a power of two (exact rescaling, no overflow).
    backend: "auto" (CUDA kernels where the GPU and torch support them, emulation otherwise),
        "emulated" (exact quantise/dequantise emulation on any device) or "cuda" (error if the
        kernels are unavailable).
    dgrad_in_fp8, wgrad_in_fp8: run the input-gradient (Dgrad) and weight-gradient (Wgrad) GEMMs
        in FP8 (DeepSeek-V3: both True). False runs that GEMM as nn.Linear would, in the forward
        pass's output dtype (the autocast dtype under autocast), trading speed for gradients
        without E4M3 rounding (torchao's "rowwise_with_gw_hp" recipe keeps Wgrad high this way).
        The forward GEMM is always FP8.
    """

    block_size: int = 128
    amax_floor: float = 1e-12
    power_of_two_scales: bool = False
    backend: str = "auto"
    dgrad_in_fp8: bool = True
    wgrad_in_fp8: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"FP8Config.block_size must be a positive int, got {self.block_size!r}")
        for name in ("power_of_two_scales", "dgrad_in_fp8", "wgrad_in_fp8"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FP8Config.{name} must be a bool, got {getattr(self, name)!r}")
        if not (math.isfinite(self.amax_floor) and self.amax_floor > 0):
            raise ValueError(f"FP8Config.amax_floor must be a positive finite float, got {self.amax_floor!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"FP8Config.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def activation_block(self) -> tuple[int, int]:
        return (1, self.block_size)

    @property
    def weight_block(self) -> tuple[int, int]:
        return (self.block_size, self.block_size)


def quantize_activation(x: Tensor, config: FP8Config) -> BlockQuantized:
    """x (..., R, C) in 1 x block_size tiles along its last (reduction) dimension."""
    return quantize_blockwise(
        x, config.activation_block, amax_floor=config.amax_floor, power_of_two=config.power_of_two_scales
    )


def quantize_weight(w: Tensor, config: FP8Config) -> BlockQuantized:
    """w (..., N, K) in block_size x block_size blocks."""
    return quantize_blockwise(
        w, config.weight_block, amax_floor=config.amax_floor, power_of_two=config.power_of_two_scales
    )


def cuda_block_scaled_mm_available(device: torch.device) -> bool:
    """Whether `scaled_mm` with 1x128 / 128x128 block scales runs on `device` (Hopper + cuBLAS >= 12.9)."""
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or torch.version.cuda is None:
        return False
    cuda_version = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    return cuda_version >= MIN_CUBLAS and torch.cuda.get_device_capability(device) == (9, 0)


def select_backend(config: FP8Config, device: torch.device) -> str:
    """ "cuda" or "emulated" for tensors on `device` under `config.backend`."""
    if config.backend == "emulated":
        return "emulated"
    available = cuda_block_scaled_mm_available(device) and config.block_size == CUDA_BLOCK
    if config.backend == "cuda" and not available:
        raise RuntimeError(
            f"FP8Config.backend='cuda' needs a Hopper (sm90) GPU, cuBLAS >= 12.9, torch >= 2.10 "
            f"(torch.nn.functional.scaled_mm) and block_size={CUDA_BLOCK}; got device {device}, "
            f"block_size={config.block_size}"
        )
    if not available and device.type == "cuda":
        warnings.warn(
            f"block-scaled FP8 kernels are unavailable on {device}; running the exact emulation",
            stacklevel=3,
        )
    return "cuda" if available else "emulated"


def block_scaled_mm(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype, backend: str) -> Tensor:
    """a @ b^T for a (..., M, K) in 1 x bs tiles and b (..., N, K) in bs x bs blocks or 1 x bs tiles.

    Returns (..., M, N) of out_dtype, accumulated in float32. The "cuda" back end takes 2-D operands.
    """
    if a.block[0] != 1 or b.block[1] != a.block[1] or b.block[0] not in (1, a.block[1]):
        raise ValueError(f"unsupported block pair a={a.block}, b={b.block}: need a 1xB and b BxB or 1xB")
    if backend == "cuda":
        rows, cols = a.data.shape[0], b.data.shape[0]
        return F.scaled_mm(**scaled_mm_arguments(a, b, out_dtype))[:rows, :cols]
    return (a.dequantize() @ b.dequantize().transpose(-2, -1)).to(out_dtype)


def activation_mm(x: Tensor, w: BlockQuantized, config: FP8Config, out_dtype: torch.dtype, backend: str) -> Tensor:
    """x @ w^T with x (..., M, K) quantised here in 1 x bs tiles along K, w (..., N, K) -> (..., M, N).

    Fprop (x times the weight) and Dgrad (dy times the transposed weight) are both this GEMM.
    """
    return block_scaled_mm(quantize_activation(x, config), w, out_dtype, backend)


def weight_grad_mm(dy: Tensor, x: Tensor, config: FP8Config, backend: str) -> Tensor:
    """Wgrad dW = dy^T x in float32: dy (..., M, N), x (..., M, K) -> (..., N, K).

    Both operands are quantised in 1 x bs tiles along M, the tokens this GEMM reduces over.
    """
    dy_t = quantize_activation(dy.transpose(-2, -1), config)  # (..., N, M)
    x_t = quantize_activation(x.transpose(-2, -1), config)  # (..., K, M)
    return block_scaled_mm(dy_t, x_t, torch.float32, backend)


def high_precision_mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """a (..., M, K) @ b (..., N, K)^T without FP8, as nn.Linear computes it: both operands in
    `compute_dtype` -> (..., M, N) of `out_dtype`. For the GEMMs a recipe keeps out of FP8."""
    return (a.to(compute_dtype) @ b.to(compute_dtype).transpose(-2, -1)).to(out_dtype)


def scaled_mm_arguments(a: BlockQuantized, b: BlockQuantized, out_dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of `torch.nn.functional.scaled_mm` computing a @ b^T (padded, see module doc).

    Layouts cuBLASLt requires on Hopper (row-major a, column-major b):
      1x128 scales:   (rows, K/128) with strides (1, rows)      "outer-dim-major"
      128x128 scales: (L4, N/128) with strides (1, L4), L4 = round_up(K/128, 4)
    """
    from torch.nn.functional import ScalingType

    a = _pad_operand(a, row_multiple=16, col_multiple=CUDA_BLOCK)
    b = _pad_operand(b, row_multiple=16, col_multiple=CUDA_BLOCK)
    if b.block[0] == 1:
        scale_b, recipe_b = _outer_dim_major(b.scale), ScalingType.BlockWise1x128
    else:
        k_blocks = b.scale.shape[1]
        scale_b = F.pad(b.scale, (0, -k_blocks % 4)).contiguous().t()  # pad keeps strides
        recipe_b = ScalingType.BlockWise128x128
    return {
        "mat_a": a.data,
        "mat_b": b.data.t(),
        "scale_a": _outer_dim_major(a.scale),
        "scale_recipe_a": ScalingType.BlockWise1x128,
        "scale_b": scale_b,
        "scale_recipe_b": recipe_b,
        "output_dtype": out_dtype,
        "use_fast_accum": False,
    }


def _outer_dim_major(scale: Tensor) -> Tensor:
    """Same shape, strides (1, rows): the column-major layout cuBLASLt reads 1x128 scales in."""
    return scale.t().contiguous().t()


def _pad_operand(q: BlockQuantized, *, row_multiple: int, col_multiple: int) -> BlockQuantized:
    """Zero-pad a 2-D operand to the given multiples; new scale entries are 1 (their data is 0)."""
    rows, cols = q.data.shape
    pad_rows, pad_cols = -rows % row_multiple, -cols % col_multiple
    if pad_rows == 0 and pad_cols == 0:
        return BlockQuantized(q.data.contiguous(), q.scale, q.block)
    # float8_e4m3fn zero is the all-zero bit pattern; F.pad has no float8 kernels.
    data = F.pad(q.data.view(torch.uint8), (0, pad_cols, 0, pad_rows)).view(q.data.dtype)
    scale_rows = -(-(rows + pad_rows) // q.block[0])
    scale_cols = -(-(cols + pad_cols) // q.block[1])
    scale_pad = (0, scale_cols - q.scale.shape[1], 0, scale_rows - q.scale.shape[0])
    return BlockQuantized(data, F.pad(q.scale, scale_pad, value=1.0), q.block)


def gemm_output_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Linear would return for input x: the autocast dtype inside autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


__all__ = [
    "BACKENDS",
    "FP8Config",
    "activation_mm",
    "block_scaled_mm",
    "cuda_block_scaled_mm_available",
    "gemm_output_dtype",
    "high_precision_mm",
    "quantize_activation",
    "quantize_weight",
    "scaled_mm_arguments",
    "select_backend",
    "weight_grad_mm",
]
