"""The CUDA back end (torch scaled_mm with 1x128 / 128x128 block scales) against the emulation.

Both back ends consume the same FP8 data and scales; only the float32 summation order differs,
so results agree to accumulation rounding.
"""

import pytest
import torch

from r1kit.policy.fp8_gemm import FP8Config, cuda_block_scaled_mm_available
from r1kit.policy.fp8_grouped import fp8_grouped_linear
from r1kit.policy.fp8_linear import fp8_linear
from r1kit.policy.fp8_quant import quantize_blockwise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_block_scaled_mm_available(torch.device("cuda"))),
        reason="needs a Hopper GPU with cuBLAS >= 12.9 and torch.nn.functional.scaled_mm",
    ),
]

CUDA, EMULATED = FP8Config(backend="cuda"), FP8Config(backend="emulated")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def linear_outputs(x, weight, bias, dy, config):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = fp8_linear(x, weight, bias, config)
    return (y, *torch.autograd.grad(y, (x, weight, bias), dy))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("tokens", "n", "k"), [(256, 1536, 7168), (333, 576, 7168), (100, 200, 300)])
def test_cuda_linear_matches_emulation(dtype, tolerance, tokens, n, k):
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    weight = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    dy = torch.randn(tokens, n, device="cuda", dtype=dtype)
    fast = linear_outputs(x, weight, bias, dy, CUDA)
    slow = linear_outputs(x, weight, bias, dy, EMULATED)
    for got, want in zip(fast, slow, strict=True):
        assert got.dtype == want.dtype
        assert relative_error(got, want) < tolerance


@pytest.mark.parametrize("backward_in_fp8", [True, False])
def test_cuda_grouped_gemm_matches_emulation(backward_in_fp8):
    flags = {"dgrad_in_fp8": backward_in_fp8, "wgrad_in_fp8": backward_in_fp8}
    counts = torch.tensor([300, 0, 17, 129], device="cuda")
    x = torch.randn(int(counts.sum()), 2048, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(4, 1024, 2048, device="cuda") * 0.02).requires_grad_()
    dy = torch.randn(x.shape[0], 1024, device="cuda", dtype=torch.bfloat16)
    results = []
    for config in (FP8Config(backend="cuda", **flags), FP8Config(backend="emulated", **flags)):
        x_leaf = x.clone().requires_grad_()
        y = fp8_grouped_linear(x_leaf, weight, counts, config)
        results.append((y, *torch.autograd.grad(y, (x_leaf, weight), dy)))
    for got, want in zip(*results, strict=True):
        assert relative_error(got, want) < 1e-2


def test_cuda_gemm_consumes_emulated_operands_exactly():
    # Power-of-two scales and entries in {-2, ..., 2} make every product and partial sum exact,
    # even in a reduced-precision tensor-core accumulator: the back ends must agree bit for bit.
    config = FP8Config(backend="cuda", power_of_two_scales=True)
    x = torch.randint(-2, 3, (256, 512), device="cuda").float()
    weight = torch.randint(-2, 3, (384, 512), device="cuda").float()
    y_fast = fp8_linear(x, weight, None, config)
    y_slow = fp8_linear(x, weight, None, FP8Config(backend="emulated", power_of_two_scales=True))
    expected = quantize_blockwise(x, (1, 128), amax_floor=1e-12, power_of_two=True).dequantize() @ (
        quantize_blockwise(weight, (128, 128), amax_floor=1e-12, power_of_two=True).dequantize().t()
    )
    assert torch.equal(y_fast, y_slow) and torch.equal(y_slow, expected)
