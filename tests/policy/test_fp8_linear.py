import pytest
import torch
from torch import nn

from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_linear import (
    FP8Linear,
    FrozenFP8Linear,
    convert_to_fp8,
    convert_to_frozen_fp8,
    fp8_linear,
)
from r1kit.policy.fp8_quant import quantize_blockwise

CONFIG = FP8Config()


def fake_quant(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return quantize_blockwise(t, block, amax_floor=CONFIG.amax_floor).dequantize()


def assert_same_gemm(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_three_gemms_follow_the_tiling_recipe():
    layer = FP8Linear.from_linear(nn.Linear(300, 200), CONFIG)
    x = torch.randn(2, 3, 300, requires_grad=True)
    dy = torch.randn(2, 3, 200)
    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)

    x2d, dy2d, w = x.detach().reshape(6, 300), dy.reshape(6, 200), layer.weight.detach()
    expected_y = fake_quant(x2d, (1, 128)) @ fake_quant(w, (128, 128)).t() + layer.bias.detach()
    expected_dx = fake_quant(dy2d, (1, 128)) @ fake_quant(w, (128, 128))  # tiles along N, W blocks reused
    expected_dw = fake_quant(dy2d.t(), (1, 128)) @ fake_quant(x2d.t(), (1, 128)).t()  # tiles along tokens
    # Same FP8 operands as the transcription; only the fp32 summation order may differ. A wrong
    # tiling changes a few per cent of the operands and misses this tolerance by orders of magnitude.
    assert_same_gemm(y, expected_y.reshape(2, 3, 200))
    assert_same_gemm(dx, expected_dx.reshape(2, 3, 300))
    assert_same_gemm(dw, expected_dw)
    assert torch.equal(db, dy2d.sum(0))


@pytest.mark.parametrize(("dgrad_in_fp8", "wgrad_in_fp8"), [(False, True), (True, False), (False, False)])
def test_backward_gemms_kept_out_of_fp8_are_plain_gemms(dgrad_in_fp8, wgrad_in_fp8):
    config = FP8Config(dgrad_in_fp8=dgrad_in_fp8, wgrad_in_fp8=wgrad_in_fp8)
    weight = nn.Linear(300, 200, bias=False).weight
    x, dy = torch.randn(6, 300, requires_grad=True), torch.randn(6, 200)
    y = fp8_linear(x, weight, None, config)
    assert torch.equal(y, fp8_linear(x, weight, None, CONFIG))  # the forward GEMM stays FP8
    grads = torch.autograd.grad(y, (x, weight), dy)
    fp8_grads = torch.autograd.grad(fp8_linear(x, weight, None, CONFIG), (x, weight), dy)
    exact_grads = (dy @ weight.detach(), dy.t() @ x.detach())
    for got, in_fp8, fp8, exact in zip(grads, (dgrad_in_fp8, wgrad_in_fp8), fp8_grads, exact_grads, strict=True):
        if in_fp8:
            assert torch.equal(got, fp8) and relative_error(got, exact) > 0.01
        else:
            assert torch.equal(got, exact)


def test_high_precision_backward_gemms_run_in_the_autocast_dtype():
    layer = FP8Linear(256, 128, config=FP8Config(dgrad_in_fp8=False, wgrad_in_fp8=False))
    x = torch.randn(8, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    dy = torch.randn(8, 128, dtype=torch.bfloat16)
    y.backward(dy)
    w = layer.weight.detach()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert torch.equal(x.grad, (dy @ w.bfloat16()).float())  # what nn.Linear computes under autocast
    assert torch.equal(layer.weight.grad, (dy.t() @ x.detach().bfloat16()).float())


def test_fp8_linear_tracks_the_fp32_layer():
    linear = nn.Linear(512, 384)
    layer = FP8Linear.from_linear(linear, CONFIG)
    x = torch.randn(64, 512, requires_grad=True)
    dy = torch.randn(64, 384)
    fp8 = torch.autograd.grad(layer(x), (x, layer.weight), dy)
    fp32 = torch.autograd.grad(linear(x), (x, linear.weight), dy)
    for got, want in zip((layer(x), *fp8), (linear(x), *fp32), strict=True):
        assert relative_error(got, want) < 0.06  # E4M3 keeps 3 mantissa bits: ~3.6% per GEMM


def test_master_weights_stay_fp32_under_bf16_autocast():
    layer = FP8Linear(256, 128, config=CONFIG)
    x = torch.randn(8, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_drop_in_for_nn_linear():
    linear = nn.Linear(130, 70, bias=False)
    optimizer = torch.optim.AdamW(linear.parameters())
    layer = FP8Linear.from_linear(linear, CONFIG)
    assert layer.weight is linear.weight and layer.bias is None  # optimizer state stays attached
    assert optimizer.param_groups[0]["params"][0] is layer.weight
    assert layer.state_dict().keys() == linear.state_dict().keys()
    fresh = FP8Linear(130, 70, bias=False)
    fresh.load_state_dict(linear.state_dict())
    assert torch.equal(fresh.weight, linear.weight)
    with pytest.raises(ValueError, match="does not fit weight"):
        fp8_linear(torch.randn(2, 129), linear.weight, None, CONFIG)


def test_rounded_operands_equal_the_gemm_operands_and_pass_gradients_straight_through():
    layer = FP8Linear(300, 200, config=CONFIG)
    x = torch.randn(5, 300, requires_grad=True)
    weight, latent = layer.rounded_weight(), layer.rounded_input(x)
    assert torch.equal(weight, fake_quant(layer.weight.detach(), (128, 128)))
    assert torch.equal(latent, fake_quant(x.detach(), (1, 128)))
    upstream_w, upstream_x = torch.randn(200, 300), torch.randn(5, 300)
    ((weight * upstream_w).sum() + (latent * upstream_x).sum()).backward()
    # differentiating the rounding would also send gradient through every block's amax
    assert torch.equal(layer.weight.grad, upstream_w) and torch.equal(x.grad, upstream_x)


def test_empty_batch():
    layer = FP8Linear(256, 128, config=CONFIG)
    x = torch.zeros(0, 256, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 128) and x.grad.shape == (0, 256)
    assert layer.weight.grad.abs().sum() == 0


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 32)
        self.attn = nn.MultiheadAttention(32, 4)
        self.q_proj = nn.Linear(32, 32)
        self.mlp = nn.ModuleDict({"gate": nn.Linear(32, 4), "gate_proj": nn.Linear(32, 64), "up": nn.Linear(32, 64)})
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50)


def test_convert_keeps_the_higher_precision_layers():
    model = Block()
    keys = model.state_dict().keys()
    convert_to_fp8(model, CONFIG)
    converted = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert converted == {"q_proj", "mlp.gate_proj", "mlp.up"}
    assert type(model.lm_head) is nn.Linear and type(model.mlp["gate"]) is nn.Linear  # head, router
    assert not isinstance(model.attn.out_proj, FP8Linear)  # attention core untouched
    assert model.state_dict().keys() == keys

    custom = convert_to_fp8(Block(), CONFIG, skip=("mlp.*",))
    assert {n for n, m in custom.named_modules() if isinstance(m, FP8Linear)} == {"q_proj", "lm_head"}


def test_frozen_fp8_linear_uses_checkpoint_blocks_and_passes_input_gradients():
    model = nn.Sequential(nn.Linear(300, 200, bias=True))
    weight = quantize_blockwise(torch.randn(200, 300) * 0.05, (128, 128), amax_floor=1e-4, power_of_two=True)
    convert_to_frozen_fp8(model, {"0.weight": weight}, CONFIG)
    layer = model[0]
    assert isinstance(layer, FrozenFP8Linear)
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    assert not list(layer.parameters())

    x = torch.randn(5, 300, requires_grad=True)
    dy = torch.randn(5, 200)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_same_gemm(y, fake_quant(x.detach(), (1, 128)) @ weight.dequantize().t() + layer.bias)
    assert_same_gemm(dx, fake_quant(dy, (1, 128)) @ weight.dequantize())


def test_frozen_fp8_linear_dgrad_out_of_fp8_uses_the_checkpoint_weight_exactly():
    weight = quantize_blockwise(torch.randn(200, 300) * 0.05, (128, 128), amax_floor=1e-4)
    model = convert_to_frozen_fp8(
        nn.Sequential(nn.Linear(300, 200, bias=False)), {"0.weight": weight}, FP8Config(dgrad_in_fp8=False)
    )
    x, dy = torch.randn(5, 300, requires_grad=True), torch.randn(5, 200)
    (dx,) = torch.autograd.grad(model(x), x, dy)
    torch.testing.assert_close(dx, dy @ weight.dequantize(), rtol=1e-6, atol=1e-6)


def test_frozen_conversion_refuses_mismatches():
    weight = quantize_blockwise(torch.randn(200, 300), (128, 128), amax_floor=1e-4)
    with pytest.raises(KeyError, match=r"'1\.weight' does not belong"):
        convert_to_frozen_fp8(nn.Sequential(nn.Linear(300, 200)), {"1.weight": weight}, CONFIG)
    with pytest.raises(ValueError, match="module expects"):
        convert_to_frozen_fp8(nn.Sequential(nn.Linear(300, 100)), {"0.weight": weight}, CONFIG)
    with pytest.raises(ValueError, match="blocks, config expects"):
        convert_to_frozen_fp8(nn.Sequential(nn.Linear(300, 200)), {"0.weight": weight}, FP8Config(block_size=64))
