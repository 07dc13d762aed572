"""TRL's option names, with TRL's meaning: a TRL GRPOConfig / SFTConfig YAML file runs here.

Most of TRL's GRPO options have the same name here (num_generations, beta,
epsilon, epsilon_high, learning_rate, max_completion_length, temperature,
max_steps, seed, ...). The rest are translated into r1kit's options:

    TRL                                     r1kit
    loss_type grpo | dr_grpo | dapo | bnpo  aggregation sequence_mean | constant | token_mean | token_mean
    loss_type cispo | sapo                  objective cispo, aggregation token_mean | objective sapo,
                                              aggregation sequence_mean; cispo: TRL's epsilon_high E is
                                              the cap on the ratio: epsilon 1 (no lower clip), epsilon_high E - 1
    scale_rewards group | batch | none      advantage_estimator grpo | batch_std | dr_grpo
    importance_sampling_level token | seq.  objective grpo | gspo
    use_bias_correction_kl true | false     kl_estimator k3_unbiased | k3
    vllm_importance_sampling_correction,    importance_correction none (correction false) | token_tis |
      _mode token_truncate | token_mask |     token_mis | sequence_tis, importance_cap C_max (truncate),
      sequence_truncate, _clip_max C_max,     importance_bounds C_min C_max (token_mask); TRL's
      _clip_min C_min                         sequence_mask is refused (see grpo/importance.py)
    per_device_train_batch_size P,          micro_batch_size P, and prompts_per_step = P * A * processes / G
      gradient_accumulation_steps A           (TRL: one generation batch of P * A completions per process
                                              and optimizer step); sft recipe: sft_batch_size P * A * processes
    lr_scheduler_type                       lr_schedule (sft recipe: sft_lr_schedule)
    warmup_ratio r                          warmup_steps = round(r * max_steps)
    bf16                                    dtype bfloat16
    use_vllm + vllm_mode server | colocate  rollout vllm | vllm-colocated
    resume_from_checkpoint true             resume
    log_completions true | false            log_completions_steps = logging_steps | 0
    model_name_or_path, dataset_name,       model, dataset, reward
      reward_funcs (TRL's scripts)
    max_length, packing (SFTConfig)         sft_max_length, sft_packing

In the sft recipe TRL's SFTConfig names mean SFT: learning_rate, max_steps,
logging_steps, per_device_train_batch_size, gradient_accumulation_steps and
lr_scheduler_type set the sft_* options. bnpo differs from dapo only in normalising each
micro-batch by its own token count, which TRL documents as an approximation of
dapo; r1kit always divides by the step's tokens. An option TRL has and r1kit
does not support is refused, naming it. Options left out of a file keep
r1kit's defaults, which differ from TRL's for beta (0.04, TRL 0.0), the
loss aggregation (sequence_mean = TRL's grpo; TRL defaults to dapo), the KL
estimator (k3; TRL defaults to use_bias_correction_kl=True) and the importance
correction (token_tis with cap 2; TRL: none without vLLM, sequence_mask with it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.options import ConfigError, option

LOSS_TYPES = {
    "grpo": "sequence_mean",
    "dr_grpo": "constant",
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "cispo": "token_mean",
    "sapo": "sequence_mean",
}
VLLM_IMPORTANCE_SAMPLING_MODES = {
    "token_truncate": "token_tis",
    "sequence_truncate": "sequence_tis",
    "token_mask": "token_mis",
}
SCALE_REWARDS = {"group": "grpo", "true": "grpo", "batch": "batch_std", "none": "dr_grpo", "false": "dr_grpo"}
IMPORTANCE_SAMPLING_LEVELS = {"token": "grpo", "sequence": "gspo"}
LR_SCHEDULER_TYPES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
                      "cosine": "cosine"}  # fmt: skip
VLLM_MODES = {"server": "vllm", "colocate": "vllm-colocated"}
# the sft recipe: names GRPO shares, which mean SFT's there when given
SFT_MEANINGS = {
    "learning_rate": "sft_learning_rate",
    "max_steps": "sft_max_steps",
    "logging_steps": "sft_logging_steps",
}


@dataclass
class TRLOptions:
    """TRL's names for options r1kit has under other names (see recipes/trl_options.py); unset: None."""

    loss_type: str | None = option(
        None, "TRL's: grpo | dr_grpo | dapo | bnpo | cispo | sapo (sets --aggregation; cispo, sapo: --objective)."
    )
    scale_rewards: str | None = option(None, "TRL's: group | batch | none (sets --advantage_estimator).")
    importance_sampling_level: str | None = option(None, "TRL's: token | sequence (sets --objective).")
    use_bias_correction_kl: bool | None = option(None, "TRL's: k3 times the ratio (sets --kl_estimator).")
    vllm_importance_sampling_correction: bool | None = option(
        None, "TRL's: correct the sampler mismatch (false sets --importance_correction none)."
    )
    vllm_importance_sampling_mode: str | None = option(
        None, "TRL's: token_truncate | token_mask | sequence_truncate (sets --importance_correction)."
    )
    vllm_importance_sampling_clip_max: float | None = option(
        None, "TRL's C_max, default 3 (sets --importance_cap or the upper --importance_bounds)."
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, "TRL's C_min, token_mask only (sets the lower --importance_bounds)."
    )
    per_device_train_batch_size: int | None = option(
        None, "TRL's: completions per process and forward (sets --micro_batch_size and --prompts_per_step)."
    )
    gradient_accumulation_steps: int | None = option(None, "TRL's: forwards per optimizer step (see above).")
    lr_scheduler_type: str | None = option(None, "TRL's: constant | constant_with_warmup | linear | cosine.")
    warmup_ratio: float | None = option(None, "TRL's: warm-up as a fraction of max_steps (sets --warmup_steps).")
    bf16: bool | None = option(None, "TRL's: train in bfloat16 (sets --dtype).")
    use_vllm: bool | None = option(None, "TRL's: sample with vLLM (sets --rollout, with vllm_mode).")
    vllm_mode: str | None = option(None, "TRL's: server | colocate.")
    resume_from_checkpoint: str | None = option(None, "TRL's: true resumes the newest checkpoint (sets --resume).")
    log_completions: bool | None = option(None, "TRL's: log completions (sets --log_completions_steps).")
    model_name_or_path: str | None = option(None, "TRL's: the model (sets --model).")
    dataset_name: str | None = option(None, "TRL's: the dataset (sets --dataset).")
    reward_funcs: list[str] | None = option(None, "TRL's scripts': reward functions (sets --reward).")
    max_length: int | None = option(None, "TRL's SFTConfig: SFT sequence length (sets --sft_max_length).")
    packing: bool | None = option(None, "TRL's SFTConfig: pack SFT samples (sets --sft_packing).")


def trl_only_options() -> set[str]:
    """Names TRL's GRPOConfig, SFTConfig, ScriptArguments or ModelConfig have that r1kit does not."""
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import ModelConfig, ScriptArguments, SFTConfig

    kinds = (TRLGRPOConfig, SFTConfig, ScriptArguments, ModelConfig)
    return {field.name for kind in kinds for field in dataclasses.fields(kind)}


def _flag(value: Any) -> str:
    """A YAML/flag value as a lower-case word: True -> "true", "Batch" -> "batch"."""
    return str(value).lower()


def _choice(name: str, value: Any, table: dict[str, str]) -> str:
    if _flag(value) not in table:
        raise ConfigError(f"{name} {value!r}: r1kit supports {', '.join(sorted(table))}")
    return table[_flag(value)]


def apply_trl_options(trl: TRLOptions, args, config: GRPOConfig, recipe: str, given: set[str]):
    """(args, config) with the TRL options in `trl` translated (see the module docstring).

    given: the option names set in the command line or --config file (the sft recipe
    reads the shared names learning_rate and max_steps as SFT's only when given).
    Returns new RecipeArguments and GRPOConfig, validated again.
    """
    sft = recipe == "sft"
    recipe_updates: dict[str, Any] = {}
    config_updates: dict[str, Any] = {}
    if trl.loss_type is not None:
        config_updates["aggregation"] = _choice("loss_type", trl.loss_type, LOSS_TYPES)
    if trl.scale_rewards is not None:
        config_updates["advantage_estimator"] = _choice("scale_rewards", trl.scale_rewards, SCALE_REWARDS)
    if trl.importance_sampling_level is not None:
        levels = IMPORTANCE_SAMPLING_LEVELS
        config_updates["objective"] = _choice("importance_sampling_level", trl.importance_sampling_level, levels)
    if trl.loss_type is not None and _flag(trl.loss_type) in ("cispo", "sapo"):
        config_updates.update(_objective_of(_flag(trl.loss_type), config, config_updates.get("objective")))
    if trl.use_bias_correction_kl is not None:
        config_updates["kl_estimator"] = "k3_unbiased" if trl.use_bias_correction_kl else "k3"
    config_updates.update(_importance_correction_of(trl))
    if trl.per_device_train_batch_size is not None or trl.gradient_accumulation_steps is not None:
        per_device = trl.per_device_train_batch_size or 8  # TRL's defaults
        completions = per_device * (trl.gradient_accumulation_steps or 1) * int(os.environ.get("WORLD_SIZE", "1"))
        if sft:
            recipe_updates["sft_batch_size"] = completions
        else:
            if completions % config.num_generations:
                raise ConfigError(f"per_device_train_batch_size x gradient_accumulation_steps x processes = "
                                  f"{completions} completions per step is not a multiple of num_generations "
                                  f"({config.num_generations})")  # fmt: skip
            config_updates.update(micro_batch_size=per_device, prompts_per_step=completions // config.num_generations)
    if trl.lr_scheduler_type is not None:
        schedule = _choice("lr_scheduler_type", trl.lr_scheduler_type, LR_SCHEDULER_TYPES)
        (recipe_updates if sft else config_updates)["sft_lr_schedule" if sft else "lr_schedule"] = schedule
    if trl.warmup_ratio is not None:
        if sft:
            raise ConfigError("warmup_ratio: the sft recipe warms up over min(20, sft_max_steps / 10) steps")
        config_updates["warmup_steps"] = round(trl.warmup_ratio * config.max_steps)
    if trl.bf16 is not None:
        recipe_updates["dtype"] = "bfloat16" if trl.bf16 else "float32"
    if trl.use_vllm:
        recipe_updates["rollout"] = _choice("vllm_mode", trl.vllm_mode or "server", VLLM_MODES)
    if trl.resume_from_checkpoint is not None:
        if _flag(trl.resume_from_checkpoint) not in ("true", "false"):
            raise ConfigError("resume_from_checkpoint: r1kit resumes the newest checkpoint in output_dir; "
                              "give true (or --resume)")  # fmt: skip
        recipe_updates["resume"] = _flag(trl.resume_from_checkpoint) == "true"
    if trl.log_completions is not None:
        config_updates["log_completions_steps"] = config.logging_steps if trl.log_completions else 0
    renamed = (("model_name_or_path", "model"), ("dataset_name", "dataset"), ("reward_funcs", "reward"),
               ("max_length", "sft_max_length"), ("packing", "sft_packing"))  # fmt: skip
    for trl_name, ours in renamed:
        if getattr(trl, trl_name) is not None:
            recipe_updates[ours] = getattr(trl, trl_name)
    if sft:
        recipe_updates.update({SFT_MEANINGS[name]: getattr(config, name) for name in SFT_MEANINGS if name in given})
    return dataclasses.replace(args, **recipe_updates), dataclasses.replace(config, **config_updates)


def _objective_of(loss_type: str, config: GRPOConfig, level_objective: str | None) -> dict[str, Any]:
    """TRL's loss_type cispo or sapo as r1kit's objective (and cispo's clip range), both token-level."""
    if level_objective == "gspo":
        raise ConfigError(
            f"loss_type {loss_type} with importance_sampling_level sequence: r1kit's {loss_type} is token-level"
        )
    if loss_type == "sapo":
        return {"objective": "sapo"}
    cap = config.upper_epsilon  # TRL: epsilon_high (or epsilon) caps CISPO's ratio, with no lower bound
    if cap <= 1:
        raise ConfigError(
            f"loss_type cispo: TRL caps the ratio at epsilon_high ({cap}); give epsilon_high > 1 (ScaleRL's: 5.0)"
        )
    return {"objective": "cispo", "epsilon": 1.0, "epsilon_high": cap - 1}


def _importance_correction_of(trl: TRLOptions) -> dict[str, Any]:
    """TRL's vllm_importance_sampling_* options as importance_correction, importance_cap / importance_bounds."""
    names = (
        "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min",
    )
    if all(getattr(trl, name) is None for name in names):
        return {}
    if trl.vllm_importance_sampling_correction is False:
        return {"importance_correction": "none"}
    mode = _flag(trl.vllm_importance_sampling_mode or "sequence_mask")  # TRL's default mode
    if mode == "sequence_mask":
        raise ConfigError(
            "vllm_importance_sampling_mode sequence_mask (TRL's default): TRL bounds the product of "
            "the token ratios and weights the completions it keeps by it; r1kit's nearest is "
            "--importance_correction sequence_mis (geometric mean, no weights)"
        )
    correction = _choice("vllm_importance_sampling_mode", mode, VLLM_IMPORTANCE_SAMPLING_MODES)
    clip_max = trl.vllm_importance_sampling_clip_max or 3.0  # TRL's default C_max
    clip_min = trl.vllm_importance_sampling_clip_min
    if correction == "token_mis":
        return {"importance_correction": correction, "importance_bounds": [clip_min or 0.0, clip_max]}
    if clip_min is not None:
        raise ConfigError(f"vllm_importance_sampling_clip_min with {mode}: r1kit truncates weights from above only")
    return {"importance_correction": correction, "importance_cap": clip_max}
