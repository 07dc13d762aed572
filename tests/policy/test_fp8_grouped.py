import pytest
import torch

from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_grouped import ExpertSegments, fp8_grouped_linear
from r1kit.policy.fp8_linear import fp8_linear
from r1kit.policy.fp8_quant import quantize_blockwise

CONFIG = FP8Config()


def per_expert_reference(x, weight, counts, dy):
    """Expert-by-expert dense FP8 linear layers: the definition the grouped GEMM must reproduce."""
    ys, dxs, dws, start = [], [], [], 0
    for e, count in enumerate(counts.tolist()):
        x_e = x[start : start + count].detach().requires_grad_()
        w_e = weight[e].detach().requires_grad_()
        y_e = fp8_linear(x_e, w_e, None, CONFIG)
        dx_e, dw_e = torch.autograd.grad(y_e, (x_e, w_e), dy[start : start + count])
        ys.append(y_e.detach())
        dxs.append(dx_e)
        dws.append(dw_e)
        start += count
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def test_grouped_gemm_equals_one_fp8_linear_per_expert():
    counts = torch.tensor([150, 0, 7, 300, 1])  # an empty expert, a partial and a multi-tile Wgrad
    x = torch.randn(int(counts.sum()), 300, requires_grad=True)
    weight = torch.randn(5, 200, 300, requires_grad=True)
    dy = torch.randn(x.shape[0], 200)
    y = fp8_grouped_linear(x, weight, counts, CONFIG)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    expected = per_expert_reference(x, weight, counts, dy)
    for got, want in zip((y, dx, dw), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # same operands, batched summation
    assert dw[1].abs().sum() == 0


def test_backward_gemms_kept_out_of_fp8_are_plain_per_expert_gemms():
    config = FP8Config(dgrad_in_fp8=False, wgrad_in_fp8=False)
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, 300, requires_grad=True)
    weight = torch.randn(3, 200, 300, requires_grad=True)
    dy = torch.randn(14, 200)
    y = fp8_grouped_linear(x, weight, counts, config)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    assert torch.equal(y, fp8_grouped_linear(x, weight, counts, CONFIG))  # forward: still FP8
    w, rows = weight.detach(), [(0, 0, 5), (2, 5, 14)]
    for e, start, end in rows:
        torch.testing.assert_close(dx[start:end], dy[start:end] @ w[e], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw[e], dy[start:end].t() @ x.detach()[start:end], rtol=1e-5, atol=1e-4)
    assert dw[1].abs().sum() == 0


def test_wgrad_tiles_restart_at_each_expert():
    # Expert 0 holds one huge token; if its tile leaked into expert 1's tokens, expert 1's small
    # gradients would be flushed by that tile's scale and its weight gradient would collapse.
    counts = torch.tensor([1, 127])
    x = torch.randn(128, 128)
    x[0] *= 1e6
    weight = torch.randn(2, 128, 128, requires_grad=True)
    dy = torch.randn(128, 128)
    fp8_grouped_linear(x, weight, counts, CONFIG).backward(dy)
    exact = dy[1:].t() @ x[1:]
    assert ((weight.grad[1] - exact).norm() / exact.norm()).item() < 0.06


def test_grouped_gemm_under_autocast_and_with_no_tokens():
    weight = torch.randn(3, 64, 256, requires_grad=True)
    x = torch.randn(10, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_grouped_linear(x, weight, torch.tensor([4, 0, 6]), CONFIG)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    empty = torch.zeros(0, 256, requires_grad=True)
    out = fp8_grouped_linear(empty, weight, torch.zeros(3, dtype=torch.long), CONFIG)
    out.sum().backward()
    assert out.shape == (0, 64) and empty.grad.shape == (0, 256)


def test_expert_segments_round_trip():
    counts = torch.tensor([2, 0, 3])
    layout = ExpertSegments.from_counts(counts, 5)
    rows = torch.arange(10.0).reshape(5, 2)
    padded = layout.to_padded(rows)
    assert padded.shape == (3, 3, 2)
    assert torch.equal(padded[2, :3], rows[2:]) and padded[1].abs().sum() == 0
    assert torch.equal(layout.from_padded(padded), rows)
    assert layout.segments() == [(0, 0, 2), (2, 2, 5)]


def test_grouped_inputs_are_validated():
    x, weight = torch.randn(6, 128), torch.randn(2, 64, 128)
    with pytest.raises(ValueError, match="sum to 6 rows"):
        fp8_grouped_linear(x, weight, torch.tensor([2, 3]), CONFIG)
    with pytest.raises(ValueError, match="non-negative"):
        fp8_grouped_linear(x, weight, torch.tensor([7, -1]), CONFIG)
    with pytest.raises(ValueError, match="integer tensor"):
        fp8_grouped_linear(x, weight, torch.tensor([3.0, 3.0]), CONFIG)
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        fp8_grouped_linear(x, weight, torch.tensor([6]), CONFIG)
    with pytest.raises(ValueError, match="expected x \\(T, K\\)"):
        fp8_grouped_linear(x, torch.randn(2, 64, 100), torch.tensor([3, 3]), CONFIG)


def test_expert_weights_are_quantised_in_their_own_blocks():
    weight = torch.randn(2, 100, 200)
    weight[1] *= 1e-3  # a per-tensor scale over all experts would crush expert 1
    batched = quantize_blockwise(weight, CONFIG.weight_block, amax_floor=CONFIG.amax_floor)
    alone = quantize_blockwise(weight[1], CONFIG.weight_block, amax_floor=CONFIG.amax_floor)
    assert torch.equal(batched.dequantize()[1], alone.dequantize())
