"""Names vLLM's weight loaders accept, from the names the trainer's state dict uses.

The trainer pushes `policy.state_dict()` names. For any transformers model
those are the names vLLM's `load_weights` reads already (it maps them onto its
fused q/k/v and gate/up parameters itself). Our DeepSeek-V3 policy differs in
two ways, and vLLM's `DeepseekV3ForCausalLM` reads the released layout:

- routed experts are fused 3-D tensors (`mlp.experts.gate_up_proj` (E, 2I, H),
  `mlp.experts.down_proj` (E, H, I)); vLLM wants them one expert at a time
  (`mlp.experts.{e}.{gate,up,down}_proj.weight`): `r1kit.policy.checkpoint.to_released`
  splits them into views, no copy;
- the MTP modules (`mtp.*`) are not part of vLLM's main model (vLLM runs them
  only as a separate speculative-decoding draft model), so they are not sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

DEEPSEEK_V3 = "deepseek_v3"


def vllm_named_weights(named_tensors: Iterable[tuple[str, Tensor]], config) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs as vLLM's `model.load_weights` for `config` (an HF config) reads them."""
    if getattr(config, "model_type", None) != DEEPSEEK_V3:
        yield from named_tensors
        return
    from r1kit.policy.checkpoint import to_released

    for name, tensor in named_tensors:
        if name.startswith("mtp."):
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= config.num_hidden_layers:
            continue  # an MTP layer already in the released layout
        yield from to_released({name: tensor}, config)
