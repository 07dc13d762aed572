"""`RoutingBiasCallback`: the auxiliary-loss-free bias update, once per optimizer step, inside a Trainer.

For TRL's SFTTrainer (or any transformers Trainer) training our DeepSeek-V3
model: after every optimizer step it sums the step's expert loads over
data-parallel ranks (when torch.distributed is initialised) and calls
`update_routing_bias(load)`, so every rank applies the same update. With
gradient accumulation the loads of all micro-batches of the step count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from r1kit.policy.modeling import DeepseekV3PreTrainedModel


def find_routed_model(model: nn.Module) -> DeepseekV3PreTrainedModel:
    """Our model inside `model` (which may be a PEFT or DDP wrapper around it)."""
    for module in model.modules():
        if isinstance(module, DeepseekV3PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no DeepSeek-V3 policy; RoutingBiasCallback needs one")


class RoutingBiasCallback(TrainerCallback):
    """Updates every MoE layer's routing bias at the end of each optimizer step."""

    def __init__(self) -> None:
        self.last_load: torch.Tensor | None = None

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise ValueError("RoutingBiasCallback needs the Trainer to pass `model`")
        policy = find_routed_model(model)
        load = policy.routing_load()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        self.last_load = policy.update_routing_bias(load).cpu()
        return control
