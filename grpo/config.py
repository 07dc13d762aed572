"""GRPOConfig: every knob of a GRPO run, documented once, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from r1kit.grpo.advantages import ADVANTAGE_ESTIMATORS
from r1kit.grpo.importance import IS_CORRECTIONS
from r1kit.grpo.loss import AGGREGATIONS, KL_ESTIMATORS, OBJECTIVES
from r1kit.grpo.lr_schedules import DEFAULT_MILESTONES, LR_SCHEDULES, Milestones, check_milestones
from r1kit.grpo.options import ConfigError, option


@dataclass
class GRPOConfig:
    """Hyper-parameters of the GRPO trainer.

    Defaults follow DeepSeekMath (eps = 0.2, beta = 0.04, one update per rollout)
    except G and the learning rate, which suit small models; the paper used
    G = 64 and lr = 1e-6 on a 7B model.
    """

    # rollout
    num_generations: int = option(8, "G: completions per prompt (>= 2: advantages are relative to the group).")
    prompts_per_step: int = option(16, "B: prompts per optimizer step; a step trains on B * G completions.")
    max_completion_length: int = option(256, "Completion length cap, in tokens.")
    temperature: float = option(1.0, "Sampling temperature; the loss uses log-probs at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    top_k: int = option(0, "Sample among the k most likely tokens (0: all).")
    min_p: float = option(0.0, "Drop tokens less likely than min_p times the most likely one (0: none).")
    stop_strings: list[str] = option([], "A completion also ends once its text contains one of these.")

    # objective
    beta: float = option(0.04, "Weight of the KL to the reference policy; 0 skips the reference forward.")
    kl_estimator: str = option(
        "k3", "In grpo.loss.KL_ESTIMATORS: k3 (DeepSeekMath) | k3_unbiased (DeepSeek-V3.2: k3 * pi_theta / pi_old)."
    )
    epsilon: float = option(
        0.2,
        "Clip range: ratios outside [1 - epsilon, 1 + epsilon_high] are clipped (>= 1: no lower clip, as CISPO "
        "runs); gmpo clips log-ratios to [-epsilon, epsilon_high] (its paper: 0.4).",
    )
    epsilon_high: float | None = option(None, "Upper clip range (DAPO's clip-higher); None uses epsilon.")
    objective: str = option(
        "grpo", "Per-token objective in grpo.loss.OBJECTIVES: grpo | gspo | cispo | sapo | gmpo (docs/loss.md)."
    )
    sapo_temperature_pos: float = option(1.0, "sapo: the soft gate's temperature tau for positive advantages.")
    sapo_temperature_neg: float = option(1.05, "sapo: the soft gate's temperature tau for other advantages.")
    aggregation: str = option(
        "sequence_mean", "Loss aggregation in grpo.loss.AGGREGATIONS: sequence_mean | token_mean | constant."
    )
    advantage_estimator: str = option(
        "grpo", "In grpo.advantages.ADVANTAGE_ESTIMATORS: grpo | dr_grpo (no std scaling) | batch_std."
    )
    advantage_eps: float = option(1e-4, "Added to the group std before dividing.")
    mask_truncated_completions: bool = option(
        False, "Leave completions cut by max_completion_length out of the loss (DAPO's overlong filtering)."
    )
    dynamic_sampling: str = option(
        "off", "Groups whose G rewards are all equal: off (train on them) | drop | refill (sample more prompts)."
    )
    dynamic_sampling_max_rounds: int = option(4, "refill: most generation rounds per step.")
    mtp_on_completions: bool = option(
        False, "Add the policy's multi-token-prediction loss on the sampled completions (DeepSeek-V3 policies)."
    )

    # sampler / trainer mismatch
    overlap: bool = option(False, "Generate step t+1's batch while training on step t (one step off-policy).")
    keep_routing: bool = option(
        False,
        "Replay the experts the sampler chose in the trainer's forwards (DeepSeek-V3.2's keep routing; "
        "MoE policies, torch engine).",
    )
    keep_sampling_mask: bool = option(
        False,
        "Score tokens under the sampler's top-k/top-p/min-p kept set, renormalised, in the trainer too "
        "(DeepSeek-V3.2's keep sampling mask).",
    )
    importance_correction: str = option(
        "token_tis",
        "Correction of pi_old / pi_sampler in grpo.importance.IS_CORRECTIONS: none | token_tis | sequence_tis "
        "(weights truncated at importance_cap) | token_mis | icepop (tokens outside importance_bounds masked) | "
        "sequence_mis (completions whose geometric-mean ratio leaves importance_bounds masked).",
    )
    importance_cap: float = option(2.0, "token_tis / sequence_tis: weights are min(ratio, cap).")
    importance_bounds: list[float] = option(
        [0.5, 2.0], "token_mis / icepop / sequence_mis: the ratio's accepted range, low high (IcePop's: 0.5 5)."
    )
    off_policy_mask_threshold: float | None = option(
        None,
        "DeepSeek-V3.2's delta: completions with a negative advantage whose mean log(pi_sampler / pi_theta) "
        "exceeds it leave the policy-gradient term; None disables.",
    )

    # optimisation
    learning_rate: float = option(1e-6, "AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.99, "AdamW beta2.")
    warmup_steps: int = option(0, "Linear learning-rate warm-up, in optimizer steps.")
    lr_schedule: str = option(
        "constant",
        "Learning rate after warm-up, in grpo.lr_schedules.LR_SCHEDULES: constant | linear | cosine | multi_step "
        "(DeepSeek LLM's: the peak rate, then lr_milestones' drops).",
    )
    lr_milestones: list[float] = option(
        [value for milestone in DEFAULT_MILESTONES for value in milestone],
        "multi_step: (fraction, multiplier) pairs, flattened; from step fraction * total steps on, the rate is "
        "multiplier * peak. Default DeepSeek LLM's: 0.8 0.316 0.9 0.1.",
    )
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    num_iterations: int = option(1, "mu: optimizer updates per rollout batch (old log-probs cached when > 1).")
    micro_batch_size: int = option(32, "Completions per forward/backward; a step's completions are accumulated.")
    logprob_micro_batch_size: int = option(
        0,
        "Completions per no-grad log-prob forward (the reference's, and the old policy's when computed); "
        "0: micro_batch_size. Such a forward keeps no activations for backward, so it fits a larger batch, "
        "and fewer forwards pay less per-operation overhead.",
    )
    max_steps: int = option(200, "Number of GRPO steps (rollout batches).")
    seed: int = option(0, "Seed of prompt order, sampling and initialisation.")
    logprob_chunk_size: int = option(1024, "Tokens per chunk when computing log-probs from the output head.")
    padding_free: bool = option(
        True,
        "Log-prob and training forwards over each micro-batch's sequences packed into rows without padding, "
        "attention kept within each sequence (grpo/packing.py); models that cannot take packed rows run padded.",
    )
    share_prompts: bool = option(
        True,
        "With padding_free, a micro-batch's completions of one prompt follow a single copy of it, so the prompt "
        "is computed once, not once per completion (our DeepSeek-V3, and transformers models with sdpa or eager "
        "full attention in every layer; not with mtp_on_completions).",
    )

    # bookkeeping
    output_dir: str = option("outputs/grpo", "Run directory: checkpoints, metrics.jsonl, report.png, final/.")
    logging_steps: int = option(1, "Log metrics every N steps.")
    save_steps: int = option(0, "Checkpoint every N steps (0: only the final model).")
    save_total_limit: int | None = option(2, "Keep the newest N checkpoints (None: all).")
    eval_steps: int = option(0, "Evaluate held-out accuracy every N steps (0: only before and after).")
    log_completions_steps: int = option(
        25, "Every N steps, write the step's completions with their rewards to samples.jsonl (0: never)."
    )

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations (G) must be >= 2 for group-relative advantages, got {self.num_generations}"
            )
        positive = ("prompts_per_step", "max_completion_length", "micro_batch_size", "max_steps",
                    "num_iterations", "logprob_chunk_size", "logging_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logprob_micro_batch_size < 0:
            raise ConfigError(f"logprob_micro_batch_size must be >= 0 (0: micro_batch_size), got "
                              f"{self.logprob_micro_batch_size}")  # fmt: skip
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ConfigError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.dynamic_sampling not in ("off", "drop", "refill"):
            raise ConfigError(f"dynamic_sampling must be off, drop or refill, got {self.dynamic_sampling!r}")
        if self.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "importance_cap"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        bounds = self.importance_bounds
        if len(bounds) != 2 or not 0 <= bounds[0] < 1 < bounds[1]:
            raise ConfigError(f"importance_bounds must be low high with 0 <= low < 1 < high, got {bounds}")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ConfigError(f"off_policy_mask_threshold must be >= 0, got {self.off_policy_mask_threshold}")
        if len(self.lr_milestones) % 2:
            raise ConfigError(f"lr_milestones must be (fraction, multiplier) pairs, got {self.lr_milestones}")
        try:
            check_milestones(self.lr_milestone_pairs)
        except ValueError as error:
            raise ConfigError(f"lr_milestones: {error}") from None
        for value, registry in (
            (self.objective, OBJECTIVES),
            (self.kl_estimator, KL_ESTIMATORS),
            (self.aggregation, AGGREGATIONS),
            (self.importance_correction, IS_CORRECTIONS),
            (self.advantage_estimator, ADVANTAGE_ESTIMATORS),
            (self.lr_schedule, LR_SCHEDULES),
        ):
            registry[value]  # raises a ValueError listing the known names

    @property
    def lr_milestone_pairs(self) -> Milestones:
        """lr_milestones as ((fraction, multiplier), ...)."""
        return tuple(zip(self.lr_milestones[::2], self.lr_milestones[1::2], strict=True))

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        return asdict(self)
