"""FP8 block-quantised checkpoints in DeepSeek-V3's released format.

The released checkpoints store each quantised projection as two tensors,

    "<module>.weight"            (N, K) float8_e4m3fn
    "<module>.weight_scale_inv"  (ceil(N / 128), ceil(K / 128)) float32

and declare the format in config.json:
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}
Despite its name, `weight_scale_inv` multiplies: w[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]
(the same convention as `BlockQuantized.scale`). Everything else (embeddings, norms, router,
output head) is stored in BF16/FP32 and passes through untouched.

Three ways in: `dequantize_fp8_tensors` (a stream of tensors) and `dequantize_fp8_state_dict`
(a mapping) turn every FP8 weight into BF16/FP32 master weights for training;
`split_fp8_state_dict` keeps the FP8 data and scales for `FrozenFP8Linear` (see
`convert_to_frozen_fp8`); `fp8_scales` pairs the weights with their scales from dtypes and shapes
alone, so the policy's loader (policy/streaming_load.py) checks a checkpoint before reading it and
then dequantises one weight, or the rows of it a rank holds, at a time. All refuse a weight
without its scale, a scale without its weight and a scale of the wrong shape, naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from r1kit.policy.fp8_quant import FP8_DTYPE, BlockQuantized

SCALE_SUFFIX = "_scale_inv"
DEEPSEEK_BLOCK = (128, 128)


def weight_block_size(model_config: Mapping) -> tuple[int, int] | None:
    """Block shape declared by a HF config dict's `quantization_config`, None if not FP8-quantised."""
    quant = model_config.get("quantization_config")
    if quant is None:
        return None
    if quant.get("quant_method") != "fp8":
        raise ValueError(f"quantization_config.quant_method is {quant.get('quant_method')!r}, expected 'fp8'")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt is {quant.get('fmt')!r}, only 'e4m3' is supported")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return (block[0], block[1])


def split_fp8_state_dict(
    state: Mapping[str, Tensor], *, block: tuple[int, int] = DEEPSEEK_BLOCK
) -> tuple[dict[str, Tensor], dict[str, BlockQuantized]]:
    """(other tensors, {"<module>.weight": BlockQuantized}) of a checkpoint mapping.

    Every float8_e4m3fn tensor must come with "<key>_scale_inv" of shape ceil(shape / block);
    every "_scale_inv" key must belong to such a tensor.
    """
    scales = fp8_scales({key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()}, block=block)
    paired = {*scales, *scales.values()}
    plain = {key: tensor for key, tensor in state.items() if key not in paired}
    quantized = {key: BlockQuantized(state[key], state[scale].float(), block) for key, scale in scales.items()}
    return plain, quantized


def fp8_scales(
    stored: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], *, block: tuple[int, int] = DEEPSEEK_BLOCK
) -> dict[str, str]:
    """{FP8 weight: its "_scale_inv"} of a checkpoint described by (dtype, shape) per tensor name.

    Raises, naming the key, on a float8_e4m3fn weight without its scale, a scale without its
    weight, a scale of the wrong shape or dtype, and any other 8-bit float.
    """
    scales: dict[str, str] = {}
    for key, (dtype, shape) in stored.items():
        if key.endswith(SCALE_SUFFIX):
            weight_key = key.removesuffix(SCALE_SUFFIX)
            if weight_key not in stored or stored[weight_key][0] != FP8_DTYPE:
                raise KeyError(f"{key!r} has no float8_e4m3fn weight {weight_key!r} to scale")
        elif dtype == FP8_DTYPE:
            scale_key = key + SCALE_SUFFIX
            if scale_key not in stored:
                raise KeyError(f"FP8 weight {key!r} has no scale {scale_key!r}")
            scale_dtype, scale_shape = stored[scale_key]
            _check_pair(key, shape, scale_shape, scale_dtype, block)
            scales[key] = scale_key
        else:
            _refuse_other_fp8(key, dtype)
    return scales


def dequantize_fp8_state_dict(
    state: Mapping[str, Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = DEEPSEEK_BLOCK,
) -> dict[str, Tensor]:
    """The checkpoint with every FP8 weight replaced by fp8 * scale_inv in `dtype`
    (computed in float32, then cast) and the "_scale_inv" keys consumed."""
    return dict(dequantize_fp8_tensors(state.items(), dtype=dtype, block=block))


def dequantize_fp8_tensors(
    named_tensors: Iterable[tuple[str, Tensor]],
    *,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = DEEPSEEK_BLOCK,
) -> Iterator[tuple[str, Tensor]]:
    """Streams (name, tensor) pairs of a checkpoint with every FP8 weight dequantised to `dtype` as
    soon as both it and its "_scale_inv" have arrived (they may sit in different shards); the
    scales are consumed, other tensors pass through untouched. Only unpaired tensors are held.
    """
    weights: dict[str, Tensor] = {}  # FP8 weights waiting for their scale
    scales: dict[str, Tensor] = {}  # scales waiting for their weight, by weight key
    for key, tensor in named_tensors:
        if key.endswith(SCALE_SUFFIX):
            weight_key = key.removesuffix(SCALE_SUFFIX)
            if weight_key in weights:
                yield weight_key, _checked(weight_key, weights.pop(weight_key), tensor, block).dequantize(dtype)
            else:
                scales[weight_key] = tensor
        elif tensor.dtype == FP8_DTYPE:
            if key in scales:
                yield key, _checked(key, tensor, scales.pop(key), block).dequantize(dtype)
            else:
                weights[key] = tensor
        else:
            _refuse_other_fp8(key, tensor.dtype)
            yield key, tensor
    if weights:
        key = next(iter(weights))
        raise KeyError(f"FP8 weight {key!r} has no scale {key + SCALE_SUFFIX!r}")
    if scales:
        key = next(iter(scales))
        raise KeyError(f"{key + SCALE_SUFFIX!r} has no float8_e4m3fn weight {key!r} to scale")


def _refuse_other_fp8(key: str, dtype: torch.dtype) -> None:
    if dtype.is_floating_point and dtype.itemsize == 1:
        raise TypeError(f"{key!r} is {dtype}; only float8_e4m3fn block-quantised weights are supported")


def _checked(key: str, data: Tensor, scale: Tensor, block: tuple[int, int]) -> BlockQuantized:
    """data (N, K) float8_e4m3fn with its scale (ceil(N / br), ceil(K / bc)), or an error naming `key`."""
    _check_pair(key, tuple(data.shape), tuple(scale.shape), scale.dtype, block)
    return BlockQuantized(data, scale.float(), block)


def _check_pair(
    key: str,
    shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    scale_dtype: torch.dtype,
    block: tuple[int, int],
) -> None:
    """Raises unless weight `key` is 2-D, (N, K), and its scale a float tensor (ceil(N / br), ceil(K / bc))."""
    if len(shape) != 2:
        raise ValueError(f"FP8 weight {key!r} must be 2-D, got shape {shape}")
    expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if tuple(scale_shape) != expected or not scale_dtype.is_floating_point:
        raise ValueError(
            f"{key + SCALE_SUFFIX!r} has shape {tuple(scale_shape)} and dtype {scale_dtype}; weight {key!r} of "
            f"shape {shape} in {block[0]}x{block[1]} blocks needs a float tensor of shape {expected}"
        )


__all__ = [
    "DEEPSEEK_BLOCK",
    "SCALE_SUFFIX",
    "dequantize_fp8_state_dict",
    "dequantize_fp8_tensors",
    "fp8_scales",
    "split_fp8_state_dict",
    "weight_block_size",
]
