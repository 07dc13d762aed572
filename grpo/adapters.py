"""LoRA training with peft: the reference without a second model, merged weights for the engine.

With a LoRA adapter the frozen base model *is* the reference policy of the
KL term, so no copy is kept: `AdapterDisabledReference` runs the same module
with the adapter switched off. The rollout engine holds a plain model without
adapters; `engine_weights` merges the adapter into the base weights for the
duration of a weight sync and yields them under the plain model's names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
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


@contextlib.contextmanager
def engine_weights(
    model: nn.Module, state_dict: dict[str, Tensor] | None = None
) -> Iterator[Iterator[tuple[str, Tensor]]]:
    """(name, tensor) pairs for a rollout engine's plain copy of `model`; adapters merged while open.

    state_dict: the full weights when the module's own are sharded (see GRPOTrainer); ignored for LoRA models.
    """
    if not is_peft_model(model):
        yield iter((model.state_dict() if state_dict is None else state_dict).items())
        return
    model.base_model.merge_adapter()
    try:
        yield ((plain, t) for name, t in model.state_dict().items() if (plain := _plain_name(name)) is not None)
    finally:
        model.base_model.unmerge_adapter()
