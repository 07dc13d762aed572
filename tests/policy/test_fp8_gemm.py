import pytest
import torch
import torch.nn.functional as F

from r1kit.policy.fp8_gemm import (
    FP8Config,
    block_scaled_mm,
    cuda_block_scaled_mm_available,
    quantize_activation,
    quantize_weight,
    scaled_mm_arguments,
    select_backend,
)
from r1kit.policy.fp8_quant import FP8_DTYPE, BlockQuantized, dequantize_blockwise

CONFIG = FP8Config()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("block_size", {"block_size": 0}),
        ("block_size", {"block_size": True}),
        ("amax_floor", {"amax_floor": 0.0}),
        ("amax_floor", {"amax_floor": float("nan")}),
        ("backend", {"backend": "tpu"}),
        ("dgrad_in_fp8", {"dgrad_in_fp8": "no"}),
        ("wgrad_in_fp8", {"wgrad_in_fp8": 0}),
        ("power_of_two_scales", {"power_of_two_scales": 1}),
    ],
)
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"FP8Config.{field}"):
        FP8Config(**kwargs)


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    assert not cuda_block_scaled_mm_available(cpu)
    assert select_backend(FP8Config(), cpu) == "emulated"
    assert select_backend(FP8Config(backend="emulated"), cpu) == "emulated"
    with pytest.raises(RuntimeError, match="sm90"):
        select_backend(FP8Config(backend="cuda"), cpu)


def test_block_pairs_outside_the_recipe_are_refused():
    x = quantize_activation(torch.randn(4, 256), CONFIG)
    w = quantize_weight(torch.randn(8, 256), CONFIG)
    with pytest.raises(ValueError, match="unsupported block pair"):
        block_scaled_mm(w, x, torch.float32, "emulated")  # a must be the 1 x 128 operand


def gemm_operands(kind: str, m: int, n: int, k: int, device: str = "cpu"):
    """(a, b) of one of the recipe's three GEMMs, each in the a @ b^T form."""
    x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    if device == "meta":
        x, w, dy = x.to("meta"), w.to("meta"), dy.to("meta")
    if kind == "fprop":
        return quantize_activation(x, CONFIG), quantize_weight(w, CONFIG)
    if kind == "dgrad":
        return quantize_activation(dy, CONFIG), quantize_weight(w, CONFIG).transpose()
    return quantize_activation(dy.t(), CONFIG), quantize_activation(x.t(), CONFIG)  # wgrad


@pytest.mark.parametrize("kind", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("n", [256, 512])
def test_cuda_arguments_pass_torch_scaled_mm_shape_and_stride_checks(kind, n):
    # torch's own checks of F.scaled_mm run on meta tensors without a GPU. K = 384 (3 blocks)
    # exercises the L4 padding of 128x128 scales (and N = 512 its absence in Dgrad), M = 100
    # the row padding.
    a, b = gemm_operands(kind, m=100, n=n, k=384, device="meta")
    out = F.scaled_mm(**scaled_mm_arguments(a, b, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.shape[0] >= a.data.shape[0] and out.shape[1] >= b.data.shape[0]


def unpack_arguments(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise the padded operands exactly as cuBLASLt reads them."""
    mat_a, mat_b = args["mat_a"], args["mat_b"].t()  # (Mp, Kp), (Np, Kp)
    a = dequantize_blockwise(mat_a, args["scale_a"], (1, 128))
    scale_b = args["scale_b"]
    if str(args["scale_recipe_b"]).endswith("BlockWise1x128"):
        b = dequantize_blockwise(mat_b, scale_b, (1, 128))
    else:  # (L4, N/128) -> (N/128, K/128)
        b = dequantize_blockwise(mat_b, scale_b.t()[:, : mat_b.shape[1] // 128], (128, 128))
    return a, b


@pytest.mark.parametrize("kind", ["fprop", "dgrad", "wgrad"])
def test_cuda_arguments_describe_the_emulated_product(kind):
    a, b = gemm_operands(kind, m=100, n=200, k=300)
    args = scaled_mm_arguments(a, b, torch.float32)
    assert args["mat_a"].is_contiguous() and args["mat_b"].t().is_contiguous()  # row-major x column-major
    assert args["mat_a"].shape[1] % 128 == 0 and args["mat_b"].shape[1] % 16 == 0
    assert args["scale_a"].stride(0) == 1  # outer-dim-major 1x128 scales
    padded_a, padded_b = unpack_arguments(args)
    rows, cols, depth = a.data.shape[0], b.data.shape[0], a.data.shape[1]
    assert torch.equal(padded_a[:rows, :depth], a.dequantize())
    assert torch.equal(padded_b[:cols, :depth], b.dequantize())
    assert padded_a[rows:].abs().sum() == 0 and padded_a[:, depth:].abs().sum() == 0
    assert padded_b[cols:].abs().sum() == 0 and padded_b[:, depth:].abs().sum() == 0
    expected = block_scaled_mm(a, b, torch.float32, "emulated")
    torch.testing.assert_close((padded_a @ padded_b.t())[:rows, :cols], expected, rtol=1e-4, atol=1e-4)


def test_operands_keep_fp8_data_and_fp32_scales():
    a, b = gemm_operands("fprop", m=8, n=8, k=256)
    assert isinstance(a, BlockQuantized) and a.data.dtype == FP8_DTYPE and b.scale.dtype == torch.float32
