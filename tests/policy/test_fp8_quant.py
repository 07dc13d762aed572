import math
import struct

import pytest
import torch

from r1kit.policy.fp8_quant import (
    FP8_DTYPE,
    BlockQuantized,
    block_scales,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_tensorwise,
)

FLOOR = 1e-12


def f32(v: float) -> float:
    """Round a Python float to the nearest float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


def round_e4m3(v: float) -> float:
    """Nearest E4M3 value to v (|v| <= 448), ties to even: 3 mantissa bits, normals from 2**-6,
    subnormal step 2**-9. Written from the format's definition, independent of torch's cast."""
    if v == 0.0:
        return 0.0
    _, exponent = math.frexp(abs(v))  # |v| = m * 2**exponent with m in [0.5, 1)
    quantum = 2.0 ** (max(exponent - 1, -6) - 3)
    return round(v / quantum) * quantum  # Python's round() is round-half-to-even


def reference_fake_quant(x: list[list[float]], block: tuple[int, int], floor: float, pow2: bool):
    """Hand transcription of the block formula: dequant(quant(x)) and the scales, block by block."""
    rows, cols = len(x), len(x[0])
    out = [[0.0] * cols for _ in range(rows)]
    scales = []
    for r0 in range(0, rows, block[0]):
        scale_row = []
        for c0 in range(0, cols, block[1]):
            cells = [(r, c) for r in range(r0, min(r0 + block[0], rows)) for c in range(c0, min(c0 + block[1], cols))]
            amax = max(abs(x[r][c]) for r, c in cells)
            scale = f32(max(amax, f32(floor)) / 448.0)
            if pow2:
                mantissa, exponent = math.frexp(scale)
                scale = 2.0 ** (exponent - 1 if mantissa == 0.5 else exponent)
            for r, c in cells:
                q = round_e4m3(min(max(f32(x[r][c] / scale), -448.0), 448.0))
                out[r][c] = f32(q * scale)
            scale_row.append(scale)
        scales.append(scale_row)
    return torch.tensor(out, dtype=torch.float32), torch.tensor(scales, dtype=torch.float32)


def edge_case_matrix(rows: int, cols: int) -> torch.Tensor:
    """Random data plus rows that hit saturation, the floor, subnormals and ties."""
    x = torch.randn(rows, cols) * torch.logspace(-3, 2, cols)
    x[0, :] = 0.0  # all-zero tiles: scale comes from the floor
    x[1, :] = 1e-14  # below the floor
    x[2, :5] = torch.tensor([1.000100016593933, -0.5, 3e-4, 1e-6, -1e-7])  # x / s = 448.00003 > 448
    x[3, :6] = torch.tensor([448.0, 8.5, 9.5, -448.0, 2.0**-10, 3 * 2.0**-10])  # exact scale 1: ties
    # x / s is exactly the tie 12.5 (-> 12) while x * (1 / s) is not: the division is observable
    x[4, :2] = torch.tensor([1.0010000467300415, 0.02792968973517418])
    return x


@pytest.mark.parametrize("pow2", [False, True])
def test_activation_tiles_match_hand_transcription(pow2):
    x = edge_case_matrix(5, 300)  # 300 = two full 1x128 tiles and a partial one
    q = quantize_blockwise(x, (1, 128), amax_floor=FLOOR, power_of_two=pow2)
    expected, expected_scales = reference_fake_quant(x.tolist(), (1, 128), FLOOR, pow2)
    assert q.data.dtype == FP8_DTYPE and q.data.shape == (5, 300)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (5, 3)
    assert torch.equal(q.scale, expected_scales)
    assert torch.equal(q.dequantize(), expected)


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_blocks_match_hand_transcription(pow2):
    w = edge_case_matrix(136, 200) * 0.01  # 2 x 2 blocks, the last row and column of blocks partial
    w[130:, 150:] = 0.0  # a partial block that is all zero
    q = quantize_blockwise(w, (128, 128), amax_floor=FLOOR, power_of_two=pow2)
    expected, expected_scales = reference_fake_quant(w.tolist(), (128, 128), FLOOR, pow2)
    assert q.scale.shape == (2, 2)
    assert torch.equal(q.scale, expected_scales)
    assert torch.equal(q.dequantize(), expected)


def test_saturation_ties_and_subnormals_by_value():
    x = torch.tensor([[448.0, 8.5, 9.5, -448.0, 2.0**-10, 3 * 2.0**-10]])
    values = quantize_blockwise(x, (1, 128), amax_floor=FLOOR).dequantize()
    # scale = 448 / 448 = 1: 8.5 and 9.5 tie to the even mantissas 8 and 10; 2**-10 is half the
    # smallest subnormal 2**-9 and ties to 0; 3 * 2**-10 ties to 2 * 2**-9.
    assert values[0].tolist() == [448.0, 8.0, 10.0, -448.0, 0.0, 2 * 2.0**-9]

    amax = torch.tensor([[1.000100016593933, 0.25]])
    assert (amax[0, 0] / (amax[0, 0] / 448.0)).item() > 448.0  # the element equal to amax overflows
    q = quantize_blockwise(amax, (1, 128), amax_floor=FLOOR)
    assert q.data.float()[0, 0].item() == 448.0  # clamped, never NaN
    assert torch.isfinite(q.dequantize()).all()


def test_zero_and_tiny_blocks_use_the_floor():
    x = torch.zeros(2, 256)
    x[1, 128:] = 1e-14
    q = quantize_blockwise(x, (1, 128), amax_floor=FLOOR)
    assert torch.equal(q.scale, torch.full((2, 2), f32(f32(FLOOR) / 448.0)))
    assert torch.equal(q.dequantize()[0], torch.zeros(256))
    assert torch.isfinite(q.dequantize()).all()


def test_power_of_two_scales_round_up_and_never_overflow():
    amax = torch.tensor([448.0, 1.0, 3.0, 896.0, 1e-20, 7e5])
    scales = block_scales(amax, amax_floor=FLOOR, power_of_two=True)
    mantissa, _ = torch.frexp(scales)
    assert torch.all(mantissa == 0.5)  # exact powers of two
    assert torch.all(amax.clamp_min(FLOOR) / scales <= 448.0)
    assert torch.all(amax.clamp_min(FLOOR) / scales > 224.0)  # rounded up by less than a factor of 2
    assert scales[0].item() == 1.0 and scales[3].item() == 2.0  # powers of two stay put


def test_weight_blocks_transpose_with_the_matrix():
    w = torch.randn(300, 200)
    direct = quantize_blockwise(w.t(), (128, 128), amax_floor=FLOOR)
    transposed = quantize_blockwise(w, (128, 128), amax_floor=FLOOR).transpose()
    assert transposed.block == (128, 128)
    assert torch.equal(direct.scale, transposed.scale)
    assert torch.equal(direct.data.view(torch.uint8), transposed.data.view(torch.uint8))


def test_batched_quantisation_equals_per_matrix():
    w = torch.randn(3, 150, 260)
    batched = quantize_blockwise(w, (128, 128), amax_floor=FLOOR, power_of_two=True)
    for e in range(3):
        single = quantize_blockwise(w[e], (128, 128), amax_floor=FLOOR, power_of_two=True)
        assert torch.equal(batched.scale[e], single.scale)
        assert torch.equal(batched.data[e].view(torch.uint8), single.data.view(torch.uint8))


def test_tensorwise_is_a_single_block_and_bf16_inputs_quantise_like_fp32():
    x = torch.randn(40, 70).bfloat16()
    q = quantize_tensorwise(x, amax_floor=FLOOR)
    assert q.scale.shape == (1, 1)
    assert q.scale.item() == f32(x.float().abs().max().item() / 448.0)
    assert torch.equal(
        quantize_blockwise(x, (1, 128), amax_floor=FLOOR).dequantize(),
        quantize_blockwise(x.float(), (1, 128), amax_floor=FLOOR).dequantize(),
    )


def test_empty_input_and_dequantize_dtype():
    q = quantize_blockwise(torch.zeros(0, 300), (1, 128), amax_floor=FLOOR)
    assert q.data.shape == (0, 300) and q.scale.shape == (0, 3)
    x = torch.randn(4, 130)
    assert quantize_blockwise(x, (1, 128), amax_floor=FLOOR).dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_blockwise(torch.ones(4, 4, dtype=torch.int32), (1, 128), amax_floor=FLOOR)
    with pytest.raises(TypeError, match="higher precision than FP8"):
        quantize_blockwise(torch.ones(4, 4).to(FP8_DTYPE), (1, 128), amax_floor=FLOOR)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        quantize_blockwise(torch.ones(4), (1, 128), amax_floor=FLOOR)
    with pytest.raises(ValueError, match="two positive ints"):
        quantize_blockwise(torch.ones(4, 4), (0, 128), amax_floor=FLOOR)
    q = quantize_blockwise(torch.ones(4, 300), (1, 128), amax_floor=FLOOR)
    with pytest.raises(ValueError, match=r"scale shape \(4, 2\) does not match"):
        dequantize_blockwise(q.data, q.scale[:, :2], q.block)
    assert isinstance(q, BlockQuantized)
