"""Named DeepSeek-V3 sizes.

    tiny-debug   every feature at toy size (2 layers: dense + MoE, 8 experts in
                 4 groups, top-2 from 2 groups, 1 shared expert, MTP depth 1);
                 forward + backward in milliseconds; used by the tests.
    tiny         the embedded default trained on CPU in minutes: hidden 160,
                 4 layers (first dense), 8 routed experts top-2 in 2 groups,
                 1 shared, MTP depth 1; vocab_size comes from the tokenizer.
    deepseek-v3  the released 671B configuration (61 layers, d=7168, 128 heads,
                 256 experts top-8 in 8 groups / 4 kept, YaRN x40). Config only.
    deepseek-v2-lite  DeepSeek-V2-Lite's sizes (15.7B: 27 layers, d=2048, 16 heads,
                 no query compression, 64 experts top-6 + 2 shared) in the V3
                 architecture. Config only (memory planning, meta-device builds).

`preset_config(name, **overrides)` returns a validated `DeepseekV3Config`.
"""

from __future__ import annotations

from typing import Any

from r1kit.policy.config import DeepseekV3Config

_TINY_DEBUG: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

_TINY: dict[str, Any] = dict(
    hidden_size=160,
    intermediate_size=384,
    moe_intermediate_size=96,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

_DEEPSEEK_V3: dict[str, Any] = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=1,
    max_position_embeddings=163840,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    bos_token_id=0,
    eos_token_id=1,
    router_bias_update_speed=0.001,
    seq_balance_alpha=1e-4,
    mtp_loss_weight=0.3,
)

# DeepSeek-V2-Lite-sized, but the V3 architecture: sigmoid affinities with the selection bias and
# normalised top-k gates (V2-Lite itself routes with a softmax, greedy top-6, unnormalised), no
# node-limited groups (V2-Lite has none), and no MTP module (V2-Lite has none). Every size is
# V2-Lite's released config.json, so the parameter count is its 15.7B.
_DEEPSEEK_V2_LITE: dict[str, Any] = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    num_nextn_predict_layers=0,
    max_position_embeddings=163840,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    bos_token_id=100000,
    eos_token_id=100001,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-debug": _TINY_DEBUG,
    "tiny": _TINY,
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
}


def preset_config(name: str, **overrides: Any) -> DeepseekV3Config:
    """The named preset with `overrides` applied; "tiny" needs vocab_size."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if "vocab_size" not in fields:
        raise ValueError(f"preset {name!r} needs vocab_size=<the tokenizer's vocabulary size>")
    unknown = sorted(key for key in overrides if not hasattr(DeepseekV3Config(), key))
    if unknown:
        raise ValueError(f"preset_config: {unknown} are not DeepseekV3Config fields")
    return DeepseekV3Config(**fields)
