"""FP8 training of the DeepSeek-V3 policy: which parts run in FP8, and the switch that turns it on.

DeepSeek-V3 (Section 3.3.1) runs the GEMMs of its linear projections in FP8 and keeps the
embedding, the output head, MoE gating, normalisation and the attention core in higher
precision. In this model:

    FP8Linear (Fprop, Dgrad, Wgrad in E4M3)   self_attn.{q_proj | q_a_proj, q_b_proj},
                                              kv_a_proj_with_mqa, kv_b_proj, o_proj; dense MLP and
                                              shared-expert gate_proj, up_proj, down_proj; the same
                                              projections inside the MTP blocks
    fp8_grouped_linear                        routed experts' gate_up_proj and down_proj
    higher precision                          embed_tokens, lm_head (also the MTP modules' head),
                                              routers (fp32 sigmoid gates), RMSNorms, RoPE, softmax
                                              attention, MTP eh_proj

MTP `eh_proj`: the paper does not list it either way. The released checkpoint stores it in BF16
with no `weight_scale_inv` (vLLM and SGLang build it as a plain nn.Linear), so it stays in
higher precision here: the released weights and training on them then see the same precision.

FP8Linear shares the Parameters of the nn.Linear it replaces, so the master weights stay the
parameters themselves, in their own dtype: state_dict keys, optimizer state and
`save_pretrained` are unchanged, an FP8-trained checkpoint holds higher-precision master weights,
and the recipe travels in config.json (`fp8`), which builds the model in FP8 again on load.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_linear import FP8Linear, convert_to_fp8
from r1kit.policy.moe import RoutedExperts

# nn.Linear modules of our model that DeepSeek-V3 keeps in higher precision (fnmatch on module names).
HIGH_PRECISION_LINEARS: tuple[str, ...] = ("lm_head", "mtp.*.eh_proj")


def enable_fp8(model: nn.Module, recipe: FP8Config) -> nn.Module:
    """Puts `model` (our DeepseekV3Model or DeepseekV3ForCausalLM) under the FP8 `recipe`, in place.

    Every projection listed in the module docstring becomes an FP8Linear sharing its parameters,
    every RoutedExperts runs its GEMMs through `fp8_grouped_linear`, and `model.config.fp8`
    records the recipe. Calling it again switches the recipe. Returns `model`.
    """
    convert_to_fp8(model, recipe, skip=HIGH_PRECISION_LINEARS)
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.fp8_config = recipe
        elif isinstance(module, RoutedExperts):
            module.fp8 = recipe
    model.config.fp8 = asdict(recipe)
    return model


def fp8_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules of `model` whose GEMMs run in FP8 (FP8Linear and routed experts)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, FP8Linear) or (isinstance(module, RoutedExperts) and module.fp8 is not None)
    ]


__all__ = ["HIGH_PRECISION_LINEARS", "enable_fp8", "fp8_layer_names"]
