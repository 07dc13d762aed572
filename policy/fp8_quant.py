"""Fine-grained FP8 block quantisation: the numerics of DeepSeek-V3's FP8 recipe (Section 3.3.2).

A tensor is cut into blocks of `block = (rows, cols)` elements along its last two dimensions
(activations: 1 x 128 tiles along the inner, reduction dimension; weights: 128 x 128 blocks).
Every block b gets its own float32 scale, stored in DeepSeek's `scale_inv` convention, i.e. the
dequantised value is `fp8 * scale`:

    amax_b = max |x| over the block                          (float32)
    s_b    = max(amax_b, amax_floor) / 448                   (float32 division; 448 = E4M3 max)
    s_b    = 2 ** ceil(log2(s_b))                            (only with power_of_two=True)
    q      = e4m3(clamp(x / s_b, -448, 448))                 (round to nearest, ties to even)
    x_hat  = float32(q) * s_b

Choices the paper leaves open, fixed here:
- The floor on amax keeps all-zero blocks finite (q = 0, s = floor / 448). Its value is an
  argument (`FP8Config.amax_floor`, default 1e-12 as in torchao's blockwise kernels); DeepSeek's
  released inference kernels use 1e-4, which is harmless for activations but would flatten
  gradient tiles whose entries are all below 1e-4 into a handful of E4M3 subnormals.
- Power-of-two scales round the scale UP (exactly, via frexp), so |x| / s <= 448 and nothing
  saturates; x / s is then exact and only the E4M3 rounding loses information.
- The clamp before the cast is explicit: torch's float32 -> float8_e4m3fn cast has mapped
  out-of-range values to NaN in some versions and saturated in others, and x / s can exceed
  448 by one ulp for the element that equals amax.
- Partial blocks: when a dimension is not a multiple of the block, the last block is partial.
  Its amax is taken over the elements that exist (the implementation pads with zeros, which
  never raise a maximum); `data` keeps the input's shape and `scale` has ceil(dim / block)
  entries along that dimension.
- Non-finite inputs are not masked: a NaN or inf makes its block's scale non-finite, so the
  whole block dequantises to NaN and the fault stays visible.

Per-tensor scaling, the baseline the block recipe is measured against, is the same formula
with a single block covering the whole matrix (`quantize_tensorwise`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value, torch.finfo(torch.float8_e4m3fn).max


class BlockQuantized(NamedTuple):
    """FP8 data with one float32 scale per block of its last two dimensions.

    data:  (..., R, C) float8_e4m3fn
    scale: (..., ceil(R / block[0]), ceil(C / block[1])) float32; value = data * scale
    block: (rows, cols) of one block, e.g. (1, 128) for activations, (128, 128) for weights
    """

    data: Tensor
    scale: Tensor
    block: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(..., R, C) tensor of `dtype`: data * scale, computed in float32."""
        return dequantize_blockwise(self.data, self.scale, self.block, dtype)

    def transpose(self) -> BlockQuantized:
        """The same numbers for the transposed matrix (..., C, R); blocks transpose with it."""
        return BlockQuantized(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), (self.block[1], self.block[0]))


def block_scales(amax: Tensor, *, amax_floor: float, power_of_two: bool = False) -> Tensor:
    """float32 scales s = max(amax, amax_floor) / 448, rounded up to a power of two if asked."""
    scale = amax.float().clamp_min(amax_floor) / FP8_MAX
    if not power_of_two:
        return scale
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # exact powers of two stay put
    return torch.ldexp(torch.ones_like(scale), exponent)


def quantize_blockwise(
    x: Tensor, block: tuple[int, int], *, amax_floor: float, power_of_two: bool = False
) -> BlockQuantized:
    """Quantise x (..., R, C) to E4M3 with one scale per `block` of its last two dimensions."""
    _check_quantizable(x, block)
    rows, cols = x.shape[-2:]
    tiles = _tiles(x.float(), block)  # (..., R/br, br, C/bc, bc)
    amax = torch.maximum(tiles.amax(dim=(-3, -1)), -tiles.amin(dim=(-3, -1)))  # (..., R/br, C/bc)
    scale = block_scales(amax, amax_floor=amax_floor, power_of_two=power_of_two)
    scaled = (tiles / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    data = _untile(scaled.to(FP8_DTYPE), rows, cols)
    return BlockQuantized(data.contiguous(), scale, (block[0], block[1]))


def dequantize_blockwise(
    data: Tensor, scale: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """data (..., R, C) * per-block scale (..., ceil(R/br), ceil(C/bc)) in float32, cast to dtype."""
    rows, cols = data.shape[-2:]
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape[-2:]) != expected or scale.shape[:-2] != data.shape[:-2]:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match data {tuple(data.shape)} "
            f"in {block[0]}x{block[1]} blocks (expected {(*data.shape[:-2], *expected)})"
        )
    tiles = _tiles(data.to(torch.float32, copy=True), block).mul_(scale.float()[..., :, None, :, None])
    return _untile(tiles, rows, cols).to(dtype)


def _tiles(x: Tensor, block: tuple[int, int]) -> Tensor:
    """(..., R, C) -> (..., ceil(R/br), br, ceil(C/bc), bc), zero-padding partial blocks."""
    rows, cols = x.shape[-2:]
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    if pad_rows or pad_cols:
        x = F.pad(x, (0, pad_cols, 0, pad_rows))  # zeros never raise a block's amax
    return x.unflatten(-1, (-1, block[1])).unflatten(-3, (-1, block[0]))


def _untile(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of `_tiles`: (..., nr, br, nc, bc) -> (..., rows, cols), dropping the padding."""
    return tiles.flatten(-2, -1).flatten(-3, -2)[..., :rows, :cols]


def quantize_tensorwise(x: Tensor, *, amax_floor: float, power_of_two: bool = False) -> BlockQuantized:
    """Per-tensor scaling of x (..., R, C): one block covering each whole matrix (the baseline)."""
    rows, cols = x.shape[-2:]
    return quantize_blockwise(x, (max(rows, 1), max(cols, 1)), amax_floor=amax_floor, power_of_two=power_of_two)


def _check_quantizable(x: Tensor, block: tuple[int, int]) -> None:
    if not x.is_floating_point() or x.dtype.itemsize == 1:
        raise TypeError(f"expected a floating-point tensor in higher precision than FP8, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected a tensor with at least 2 dimensions, got shape {tuple(x.shape)}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be two positive ints (rows, cols), got {block}")


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "BlockQuantized",
    "block_scales",
    "dequantize_blockwise",
    "quantize_blockwise",
    "quantize_tensorwise",
]
