"""Block-scaled versus per-tensor-scaled FP8 GEMM error on inputs with outliers."""

import torch

from r1kit.policy.fp8_quant import quantize_blockwise, quantize_tensorwise

FLOOR = 1e-12


def gemm_errors(x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{scaling: (relative Frobenius error, median per-token relative error)} of x @ w^T vs float64."""
    exact = x.double() @ w.double().t()
    operands = {
        "block": (
            quantize_blockwise(x, (1, 128), amax_floor=FLOOR).dequantize(),
            quantize_blockwise(w, (128, 128), amax_floor=FLOOR).dequantize(),
        ),
        "tensor": (
            quantize_tensorwise(x, amax_floor=FLOOR).dequantize(),
            quantize_tensorwise(w, amax_floor=FLOOR).dequantize(),
        ),
    }
    errors = {}
    for name, (xq, wq) in operands.items():
        diff = (xq @ wq.t()).double() - exact
        per_token = diff.norm(dim=1) / exact.norm(dim=1)
        errors[name] = ((diff.norm() / exact.norm()).item(), per_token.median().item())
    return errors


def test_outlier_channels_x100():
    x, w = torch.randn(128, 1024), torch.randn(256, 1024) * 0.02
    x[:, torch.randperm(1024)[:4]] *= 100
    errors = gemm_errors(x, w)
    assert errors["block"][0] < 0.035
    assert errors["block"][0] < 0.85 * errors["tensor"][0]


def test_outlier_tokens_beyond_the_e4m3_range():
    # Massive activations on two tokens push every other token of a per-tensor-scaled matrix
    # below E4M3's normal range (2**-6 * scale); 1 x 128 tiles are immune.
    x, w = torch.randn(128, 1024), torch.randn(256, 1024) * 0.02
    x[torch.randperm(128)[:2]] *= 1e5
    errors = gemm_errors(x, w)
    assert errors["block"][1] < 0.05
    assert errors["tensor"][1] > 5 * errors["block"][1]


def test_gradient_like_rows_spanning_ten_orders_of_magnitude():
    dy, w = torch.randn(128, 1024) * torch.logspace(-10, 0, 128)[:, None], torch.randn(256, 1024) * 0.02
    errors = gemm_errors(dy, w)
    assert errors["block"][1] < 0.05
    assert errors["tensor"][1] > 5 * errors["block"][1]
