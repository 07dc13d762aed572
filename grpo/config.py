"""GRPOConfig: every knob of a GRPO run, documented once, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from grpo.advantages import ADVANTAGE_ESTIMATORS
from grpo.loss import AGGREGATIONS, OBJECTIVES


@dataclass
class GRPOConfig:
    """Hyper-parameters of the GRPO trainer.

    Defaults follow DeepSeekMath (eps = 0.2, beta = 0.04, one update per rollout)
    except G and the learning rate, which are set for small models; the paper
    used G = 64 and lr = 1e-6 on a 7B model.
    """

    # rollout
    num_generations: int = 8
    """G: completions sampled per prompt (>= 2: advantages are relative to the group)."""
    prompts_per_step: int = 16
    """B: prompts per optimizer step; each step trains on B * G completions."""
    max_completion_length: int = 256
    """Completion length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the loss uses log-probs at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""

    # objective
    beta: float = 0.04
    """Weight of the k3 KL penalty to the reference policy; 0 skips the reference forward."""
    epsilon: float = 0.2
    """Lower clip range: ratios below 1 - epsilon are clipped."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None uses `epsilon`."""
    objective: str = "grpo"
    """Per-token objective, a name in grpo.loss.OBJECTIVES ("grpo", "gspo")."""
    aggregation: str = "sequence_mean"
    """Loss aggregation, a name in grpo.loss.AGGREGATIONS ("sequence_mean", "token_mean", "constant")."""
    advantage_estimator: str = "grpo"
    """A name in grpo.advantages.ADVANTAGE_ESTIMATORS ("grpo", "dr_grpo")."""
    advantage_eps: float = 1e-4
    """Added to the group std before dividing."""

    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    """"constant" or "cosine" (after warm-up)."""
    max_grad_norm: float = 1.0
    num_iterations: int = 1
    """mu: optimizer updates per rollout batch; with mu > 1 the old log-probs are cached before the first."""
    micro_batch_size: int = 32
    """Completions per forward/backward; the B * G completions of a step are accumulated."""
    max_steps: int = 200
    seed: int = 0
    logprob_chunk_size: int = 1024
    """Tokens per chunk when computing log-probs from the output head."""

    # bookkeeping
    output_dir: str = "outputs/grpo"
    logging_steps: int = 1
    save_steps: int = 0
    """Checkpoint every N steps (0: only the final model)."""
    save_total_limit: int | None = 2
    """Keep the newest N checkpoints (None: keep all)."""
    eval_steps: int = 0
    """Evaluate held-out accuracy every N steps (0: never during training)."""

    extra: dict = field(default_factory=dict, repr=False)
    """Free-form values recorded with the run (e.g. the recipe's arguments)."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations (G) must be >= 2 for group-relative advantages, got {self.num_generations}"
            )
        for name in (
            "prompts_per_step",
            "max_completion_length",
            "micro_batch_size",
            "max_steps",
            "num_iterations",
            "logprob_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for value, registry in (
            (self.objective, OBJECTIVES),
            (self.aggregation, AGGREGATIONS),
            (self.advantage_estimator, ADVANTAGE_ESTIMATORS),
        ):
            registry[value]  # raises a ValueError listing the known names

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        return asdict(self)
