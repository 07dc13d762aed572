"""LoRA training with peft: the reference without a second model, merged weights for the engine.

With a LoRA adapter the frozen base model *is* the reference policy of the
KL term, so no copy is kept: `AdapterDisabledReference` runs the same module
with the adapter switched off. The rollout engine holds a plain model without
adapters; `engine_weights` yields W + delta_W for every adapted weight (summed
in fp32, rounded once) under the plain model's names, out of place: merging into
the base and unmerging after each sync would round the frozen base, which is
the KL reference, a little further every time in bf16.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from r1kit.grpo.logprobs import TokenLogprobs

# LoRA targets for our DeepSeek-V3 policy: the MLA projections. The router and the routed experts stay full
# rank. MLP projections are left out on purpose: for deepseek_v3 configs peft 0.21 rewrites any gate_proj /
# up_proj / down_proj target into parameter targeting of the fused experts, even when named by full path.
DEEPSEEK_V3_LORA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "base_model") and hasattr(model, "peft_config")


class AdapterDisabledReference(nn.Module):
    """The reference forward of a LoRA policy: the policy's own forward with its adapter disabled.

    model: the (possibly accelerate-wrapped) TokenLogprobModel around a peft model.
    peft_model: that peft model, whose `disable_adapter()` switches LoRA off.
    """

    def __init__(self, model: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        self.model, self.peft_model = model, peft_model

    def forward(self, *args, **kwargs) -> TokenLogprobs:
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)


def _plain_name(name: str) -> str | None:
    """A peft state-dict name as the plain model names it; None for adapter tensors."""
    if ".lora_" in name or "lora_embedding" in name:
        return None
    return re.sub(r"(\.base_layer)+\.", ".", name.removeprefix("base_model.model."))


def engine_weights(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs for a rollout engine's plain copy of `model`, adapters merged out of place.

    state_dict: the full weights when the module's own are sharded (see GRPOTrainer); ignored for LoRA models.
    """
    if is_peft_model(model):
        return _merged_weights(model)
    return iter((model.state_dict() if state_dict is None else state_dict).items())


def _merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The plain model's (name, tensor) pairs, adapted weights as base + delta, the base untouched."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in model.state_dict().items():
        plain = _plain_name(name)
        if plain is None:
            continue
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner.removesuffix(".base_layer"))
        if layer is not None and owner.endswith(".base_layer") and leaf == "weight":
            tensor = _with_delta(layer, tensor)
        yield plain, tensor


@torch.no_grad()
def _with_delta(layer: LoraLayer, weight: Tensor) -> Tensor:
    """weight + the deltas of the layer's active adapters, summed in fp32 and rounded once to weight's dtype."""
    active = [name for name in layer.active_adapters if name in layer.lora_A or name in layer.lora_embedding_A]
    if any(layer.use_dora.get(name, False) for name in active):
        raise ValueError("weight sync of DoRA adapters is not supported; train plain LoRA (use_dora=False)")
    merged = weight.float()
    for name in active:
        merged = merged + layer.get_delta_weight(name).float()
    return merged.to(weight.dtype)
