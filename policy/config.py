"""The DeepSeek-V3 configuration: transformers' field names plus our training options.

`DeepseekV3Config` subclasses transformers' own `DeepseekV3Config`, so every
field name (hidden_size, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
qk_rope_head_dim, v_head_dim, n_routed_experts, n_group, topk_group,
rope_parameters / legacy rope_scaling, num_nextn_predict_layers, ...) means
exactly what it means there, a config.json written by either class loads into
the other, and `model_type` stays "deepseek_v3" so transformers and vLLM can
read our checkpoints.

Two released-config fields transformers' class lacks, written so that readers
of config.json (vLLM above all, whose defaults are softmax routing without a
correction bias) route as our model does; they accept only DeepSeek-V3's values:

    topk_method                "noaux_tc": top-k over sigmoid affinities plus the
                               balancing bias, which does not weight the output.
    scoring_func               "sigmoid".

Our additions, all training-only:

    router_bias_update_speed   gamma of the auxiliary-loss-free balancing:
                               b_i += gamma * sign(mean(load) - load_i), once
                               per optimizer step (DeepSeek-V3 used 0.001).
    seq_balance_alpha          alpha of the complementary sequence-wise balance
                               loss (DeepSeek-V3 used 1e-4); 0 switches it off.
    mtp_loss_weight            lambda of the multi-token-prediction loss
                               (lambda / D) * sum_k CE_k (0.3, later 0.1).
    fp8                        FP8 training recipe (docs/fp8.md): None for
                               none, else the fields of `r1kit.policy.fp8.FP8Config`
                               as a dict (block_size, amax_floor,
                               power_of_two_scales, backend, dgrad_in_fp8,
                               wgrad_in_fp8). `True` means the
                               default recipe and is stored as its dict, so
                               config.json records the exact recipe.

`num_nextn_predict_layers` (D) is the number of MTP modules; 0 builds none,
which gives a pure next-token model.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from transformers import DeepseekV3Config as _TransformersDeepseekV3Config

from r1kit.policy.fp8_gemm import FP8Config

SUPPORTED_ROPE_TYPES = ("default", "yarn")


class DeepseekV3Config(_TransformersDeepseekV3Config):
    """transformers' `DeepseekV3Config` plus routing-bias, balance-loss and MTP-loss options.

    Defaults of the inherited fields are transformers' (the 671B model without
    YaRN); use `r1kit.policy.presets.preset_config` for named sizes.
    """

    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    router_bias_update_speed: float = 0.001
    seq_balance_alpha: float = 1e-4
    mtp_loss_weight: float = 0.3
    fp8: dict | bool | FP8Config | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self._validate_sizes()
        self._validate_routing()
        self._validate_rope()
        self._validate_training_options()
        self.fp8 = fp8_recipe_fields(self.fp8)

    def fp8_recipe(self) -> FP8Config | None:
        """The FP8 training recipe this config asks for, None when FP8 is off."""
        return None if self.fp8 is None else FP8Config(**self.fp8)

    def _validate_sizes(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or > 0")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        _require(
            self.num_key_value_heads == self.num_attention_heads,
            "num_key_value_heads",
            f"must equal num_attention_heads ({self.num_attention_heads}): MLA has no grouped heads",
        )
        _require(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        _require(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
        )

    def _validate_routing(self) -> None:
        n_experts, n_group = self.n_routed_experts, self.n_group
        _require(n_experts > 0, "n_routed_experts", "must be > 0")
        _require(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        _require(n_group > 0 and n_experts % n_group == 0, "n_group", f"must divide n_routed_experts={n_experts}")
        _require(
            n_group == 1 or n_experts // n_group >= 2,
            "n_group",
            "leaves fewer than 2 experts per group (group scores sum each group's top-2 affinities)",
        )
        _require(1 <= self.topk_group <= n_group, "topk_group", f"must be in [1, n_group={n_group}]")
        reachable = self.topk_group * (n_experts // n_group)
        _require(
            1 <= self.num_experts_per_tok <= reachable,
            "num_experts_per_tok",
            f"must be in [1, topk_group * experts_per_group = {reachable}]",
        )
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        _require(self.topk_method == "noaux_tc", "topk_method", f"is {self.topk_method!r}; only 'noaux_tc' is built")
        _require(self.scoring_func == "sigmoid", "scoring_func", f"is {self.scoring_func!r}; only 'sigmoid' is built")

    def _validate_rope(self) -> None:
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        _require(
            rope_type in SUPPORTED_ROPE_TYPES,
            "rope_parameters.rope_type",
            f"is {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}",
        )
        if rope_type == "yarn":
            _require(
                rope.get("factor") is not None and rope["factor"] >= 1,
                "rope_parameters.factor",
                "must be >= 1 for YaRN",
            )
            _require(
                rope.get("original_max_position_embeddings", 0) > 0,
                "rope_parameters.original_max_position_embeddings",
                "must be > 0 for YaRN",
            )

    def _validate_training_options(self) -> None:
        _require(self.router_bias_update_speed >= 0, "router_bias_update_speed", "must be >= 0")
        _require(self.seq_balance_alpha >= 0, "seq_balance_alpha", "must be >= 0")
        _require(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")


def fp8_recipe_fields(value: object, field: str = "DeepseekV3Config.fp8") -> dict | None:
    """None / False -> None; True -> the default FP8 recipe's fields; an FP8Config or a dict of its
    fields -> all its fields, checked (errors name `field`)."""
    if value is None or value is False:
        return None
    if value is True:
        return asdict(FP8Config())
    if isinstance(value, FP8Config):
        return asdict(value)
    known = {f.name for f in fields(FP8Config)}
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be None, a bool, an FP8Config or a dict of {sorted(known)}, got {value!r}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{field} has unknown keys {unknown}; FP8Config fields are {sorted(known)}")
    try:
        return asdict(FP8Config(**value))
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"DeepseekV3Config.{field} {message}")
