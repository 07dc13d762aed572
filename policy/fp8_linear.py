"""FP8 linear layers: all three GEMMs of y = x W^T + b in E4M3 with fine-grained scales.

With x (M, K), W (N, K), dy (M, N) and every GEMM in the form a @ b^T (see fp8_gemm.py):

    GEMM    computes          a (1 x 128 tiles along)    b                                 reduction
    Fprop   y  = x W^T        x    (K)                   W    (N, K), 128 x 128 blocks      K
    Dgrad   dx = dy W         dy   (N)                   W^T  (K, N), the same blocks       N
    Wgrad   dW = dy^T x       dy^T (M, the tokens)       x^T  (K, M), 1 x 128 tiles (M)     M

so every operand is tiled along the dimension the GEMM reduces over, as in DeepSeek-V3
(Section 3.3.2, Figure 7). Accumulation is float32; y and dx come out in the activation dtype
(the autocast dtype under autocast), dW in float32 and then the parameter's dtype, so master
weights, their gradients and the optimizer state never leave higher precision.
`FP8Config.dgrad_in_fp8` / `wgrad_in_fp8` = False run that backward GEMM as nn.Linear would
(no rounding, in the forward pass's output dtype); the forward GEMM is always FP8.

Departure from the paper: DeepSeek-V3 caches the layer input in FP8 (1 x 128 tiles along K)
and, for Wgrad, dequantises and re-quantises it along the tokens. We keep the input in its own
dtype for the backward pass (exactly what nn.Linear keeps), so x is quantised once per GEMM
straight from higher precision; the weight is re-quantised in the backward pass instead of
being cached, so the layer saves nothing beyond what nn.Linear saves.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from r1kit.policy.fp8_gemm import (
    FP8Config,
    activation_mm,
    gemm_output_dtype,
    high_precision_mm,
    quantize_activation,
    quantize_weight,
    select_backend,
    weight_grad_mm,
)
from r1kit.policy.fp8_quant import FP8_DTYPE, BlockQuantized

# Layers DeepSeek-V3 keeps in higher precision that are nn.Linear in HF-style models: the output
# head (and the MTP module's shared head) and the MoE router. Embeddings, norms and the attention
# core are not nn.Linear and are never touched. Matched with fnmatch on qualified module names.
DEFAULT_SKIP_PATTERNS: tuple[str, ...] = ("lm_head", "*.lm_head", "*.head", "gate", "*.gate", "*.router")


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, config: FP8Config) -> Tensor:
        out_dtype, backend = gemm_output_dtype(x), select_backend(config, x.device)
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.reshape(-1, x.shape[-1])  # (M, K)
            y = activation_mm(x2d, quantize_weight(weight, config), config, out_dtype, backend)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(x, weight, bias)
        ctx.config, ctx.backend, ctx.compute_dtype = config, backend, out_dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        config, backend = ctx.config, ctx.backend
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2d = dy.reshape(-1, weight.shape[0])  # (M, N)
            if ctx.needs_input_grad[0]:
                if config.dgrad_in_fp8:
                    w_t = quantize_weight(weight, config).transpose()  # (K, N), blocks transposed
                    dx = activation_mm(dy2d, w_t, config, x.dtype, backend)
                else:
                    dx = high_precision_mm(dy2d, weight.t(), ctx.compute_dtype, x.dtype)
                dx = dx.reshape(x.shape)
            if ctx.needs_input_grad[1]:
                x2d = x.reshape(-1, x.shape[-1])  # (M, K)
                if config.wgrad_in_fp8:
                    dw = weight_grad_mm(dy2d, x2d, config, backend).to(weight.dtype)
                else:
                    dw = high_precision_mm(dy2d.t(), x2d.t(), ctx.compute_dtype, weight.dtype)
            if bias is not None and ctx.needs_input_grad[2]:
                db = dy2d.float().sum(0).to(bias.dtype)
        return dx, dw, db, None


class _FrozenFP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w_data: Tensor, w_scale: Tensor, bias: Tensor | None, config: FP8Config) -> Tensor:
        out_dtype, backend = gemm_output_dtype(x), select_backend(config, x.device)
        weight = BlockQuantized(w_data, w_scale, config.weight_block)
        with torch.autocast(x.device.type, enabled=False):
            y = activation_mm(x.reshape(-1, x.shape[-1]), weight, config, out_dtype, backend)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(w_data, w_scale)
        ctx.config, ctx.backend, ctx.x_dtype, ctx.compute_dtype = config, backend, x.dtype, out_dtype
        return y.reshape(*x.shape[:-1], w_data.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w_data, w_scale = ctx.saved_tensors
        weight_t = BlockQuantized(w_data, w_scale, ctx.config.weight_block).transpose()  # (K, N)
        with torch.autocast(dy.device.type, enabled=False):
            dy2d = dy.reshape(-1, w_data.shape[0])  # (M, N)
            if ctx.config.dgrad_in_fp8:
                dx = activation_mm(dy2d, weight_t, ctx.config, ctx.x_dtype, ctx.backend)
            else:  # the checkpoint's weight exactly, dy unrounded
                dx = high_precision_mm(dy2d, weight_t.dequantize(), ctx.compute_dtype, ctx.x_dtype)
        return dx.reshape(*dy.shape[:-1], w_data.shape[1]), None, None, None, None


def _straight_through(value: Tensor, rounded: Tensor) -> Tensor:
    """`rounded` in the forward pass, bit for bit (value - value.detach() is exactly zero), and the
    identity from `rounded` back to `value` in the backward pass (the straight-through estimator).
    Differentiating the rounding itself would send gradient through each block's amax."""
    return rounded + (value - value.detach())


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, config: FP8Config) -> Tensor:
    """F.linear(x, weight, bias) with its forward and both backward GEMMs in block-scaled FP8.

    x (..., K), weight (N, K), bias (N,) or None -> (..., N).
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input with {x.shape[-1]} features does not fit weight {tuple(weight.shape)}")
    return _FP8LinearFunction.apply(x, weight, bias, config)


class FP8Linear(nn.Linear):
    """Drop-in nn.Linear whose three GEMMs run in block-scaled FP8.

    Parameters, their dtypes and state_dict keys are those of nn.Linear, so checkpoints and
    optimizers see no difference; only the arithmetic of forward and backward changes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: FP8Config | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_config = config or FP8Config()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config) -> FP8Linear:
        """An FP8Linear sharing `linear`'s Parameter objects (no copy, optimizer state stays valid)."""
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, bias=has_bias, device="meta", config=config)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fp8_config)

    def rounded_weight(self) -> Tensor:
        """The weight as the FP8 GEMMs multiply by it: (N, K), each block rounded to E4M3 with its
        scale and dequantised, in the weight's dtype. For code that uses the weight outside this
        layer's forward (MLA's absorbed decoding). Gradients pass straight through to the weight.
        """
        weight = self.weight
        return _straight_through(weight, quantize_weight(weight.detach(), self.fp8_config).dequantize(weight.dtype))

    def rounded_input(self, x: Tensor) -> Tensor:
        """x (..., K) as the Fprop GEMM sees it: rounded to E4M3 per 1 x block_size tile along K
        and dequantised, in x's dtype. Gradients pass straight through to x."""
        return _straight_through(x, quantize_activation(x.detach(), self.fp8_config).dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_config}"


class FrozenFP8Linear(nn.Module):
    """y = x W^T + b with W stored as FP8 blocks plus `weight_scale_inv`, DeepSeek-V3's checkpoint format.

    Buffers: weight (N, K) float8_e4m3fn, weight_scale_inv (ceil(N/bs), ceil(K/bs)) float32,
    bias (N,) or None. W receives no gradient; gradients flow to the input through the FP8 Dgrad
    GEMM, so the layer suits frozen parts of a trained model (a reference policy, a LoRA base).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        *,
        config: FP8Config | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8_config = config or FP8Config()
        bs = self.fp8_config.block_size
        scale_shape = (-(-out_features // bs), -(-in_features // bs))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return _FrozenFP8LinearFunction.apply(x, self.weight, self.weight_scale_inv, self.bias, self.fp8_config)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.fp8_config}"


def convert_to_fp8(model: nn.Module, config: FP8Config, *, skip: Sequence[str] = DEFAULT_SKIP_PATTERNS) -> nn.Module:
    """Swap, in place, every nn.Linear of `model` whose qualified name matches no `skip` pattern
    for an FP8Linear sharing its parameters. Subclasses of nn.Linear (e.g. the out-projection
    inside nn.MultiheadAttention, which never calls its forward) and `model` itself are left
    alone. Returns `model`.
    """
    targets = [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and not any(fnmatch.fnmatchcase(name, p) for p in skip)
    ]
    for name in targets:
        _replace_module(model, name, FP8Linear.from_linear(model.get_submodule(name), config))
    return model


def convert_to_frozen_fp8(model: nn.Module, fp8_weights: Mapping[str, BlockQuantized], config: FP8Config) -> nn.Module:
    """Replace, in place, the nn.Linear owning each `"<module>.weight"` key of `fp8_weights` with a
    FrozenFP8Linear holding those FP8 data and scales (bias copied). Every key must name an
    nn.Linear of matching shape whose blocks match `config.weight_block`. Returns `model`.
    """
    modules = dict(model.named_modules())
    for key, weight in fp8_weights.items():
        name = key.removesuffix(".weight")
        module = modules.get(name) if key.endswith(".weight") and name else None
        if type(module) is not nn.Linear:
            raise KeyError(f"FP8 weight {key!r} does not belong to an nn.Linear of the model")
        if tuple(weight.data.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"FP8 weight {key!r} has shape {tuple(weight.data.shape)}, module expects "
                f"{(module.out_features, module.in_features)}"
            )
        if tuple(weight.block) != config.weight_block:
            raise ValueError(f"FP8 weight {key!r} uses {weight.block} blocks, config expects {config.weight_block}")
        frozen = FrozenFP8Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            config=config,
        )
        frozen.weight.copy_(weight.data)
        frozen.weight_scale_inv.copy_(weight.scale)
        if module.bias is not None:
            frozen.bias = module.bias.detach().clone()
        _replace_module(model, name, frozen)
    return model


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "FP8Linear",
    "FrozenFP8Linear",
    "convert_to_fp8",
    "convert_to_frozen_fp8",
    "fp8_linear",
]
