"""The GRPO objective and its variants, as pure tensor functions.

DeepSeekMath's GRPO maximises (Shao et al. 2024, eq. 3)

    J = 1/G sum_i 1/|o_i| sum_t { min(rho_it A_it, clip(rho_it, 1 - eps, 1 + eps) A_it) - beta D_KL }

with rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t) and the
unbiased, always non-negative k3 estimator of KL(pi_theta || pi_ref) (eq. 4)

    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 = exp(ref - logp) - (ref - logp) - 1.

The loss is -J. It is computed in two registered pieces:

- a per-token objective ("grpo": the clipped token ratio above, with an
  optional separate upper clip eps_high as in DAPO's clip-higher; "gspo": the
  sequence-level ratio s_i = exp(mean_t(logp - old)) of Zheng et al. 2025,
  shared by all tokens of a sequence), returning the per-token loss;
- an aggregation ("sequence_mean": the paper's mean over each sequence's tokens,
  then over sequences; "token_mean": DAPO's mean over all tokens of the batch;
  "constant": Dr. GRPO's sum over tokens divided by num_sequences *
  max_completion_length).

Departures from the paper: none in the formula. Optionally the policy-gradient
term is multiplied by per-token importance weights (truncated importance
sampling), which corrects for the mismatch between the sampler that generated
the tokens and the trainer's behaviour policy; without them the loss is the
paper's. Normalisers are passed in explicitly so that gradient accumulation over
micro-batches (and data parallelism) reproduces the full-batch loss exactly.
Nothing here calls `.item()`: statistics stay on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from r1kit.grpo.registry import Registry

# fn(logp, old_logp, advantages, mask, *, epsilon_low, epsilon_high) -> (per-token loss, ratio), (N, T) each
OBJECTIVES: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry("objective")
# fn(per_token (N, T), mask (N, T), *, num_sequences, num_tokens, max_length) -> scalar
AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("aggregation")


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@OBJECTIVES.register("grpo")
def clipped_token_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[Tensor, Tensor]:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token; returns (loss, rho), both (N, T)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    return -torch.minimum(unclipped, clipped), ratio


@OBJECTIVES.register("gspo")
def clipped_sequence_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[Tensor, Tensor]:
    """GSPO: the token ratio of `grpo` replaced by s_i = exp(mean_t(logp - old_logp)) for every token of i.

    The gradient flows through every token's logp via the mean (GSPO-token with
    uniform token advantages). Returns (loss, s) of shape (N, T).
    """
    lengths = mask.sum(dim=1).clamp(min=1)
    seq_log_ratio = ((logp - old_logp) * mask).sum(dim=1) / lengths  # (N,)
    ratio = torch.exp(seq_log_ratio).unsqueeze(1).expand_as(logp)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    return -torch.minimum(ratio * adv, clipped), ratio


@AGGREGATIONS.register("sequence_mean")
def sequence_mean(
    per_token: Tensor, mask: Tensor, *, num_sequences: float, num_tokens: float, max_length: int
) -> Tensor:
    """Mean over each sequence's tokens, then sum over sequences / num_sequences (the paper's 1/G 1/|o_i|)."""
    per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sequence.sum() / num_sequences


@AGGREGATIONS.register("token_mean")
def token_mean(per_token: Tensor, mask: Tensor, *, num_sequences: float, num_tokens: float, max_length: int) -> Tensor:
    """Sum over all tokens / num_tokens (DAPO): long completions weigh in proportion to their length."""
    return (per_token * mask).sum() / max(num_tokens, 1.0)


@AGGREGATIONS.register("constant")
def constant_normalizer(
    per_token: Tensor, mask: Tensor, *, num_sequences: float, num_tokens: float, max_length: int
) -> Tensor:
    """Sum over all tokens / (num_sequences * max_length) (Dr. GRPO): no length bias."""
    return (per_token * mask).sum() / (num_sequences * max_length)


@dataclass(frozen=True)
class LossOutput:
    """The scalar loss and detached statistics (0-dim tensors, token means over the mask).

    kl: mean k3 KL to the reference (0 when beta == 0).
    clip_low / clip_high: fraction of tokens whose ratio was clipped below / above
        where the clip changed the objective (negative / positive advantage).
    ratio: mean importance ratio rho.
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    clip_low: Tensor
    clip_high: Tensor
    ratio: Tensor


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    objective: str = "grpo",
    aggregation: str = "sequence_mean",
    importance_weights: Tensor | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    max_length: int | None = None,
) -> LossOutput:
    """The GRPO loss -J for one (micro-)batch of N completions padded to T tokens.

    logp: (N, T) log pi_theta of the sampled tokens (carries the gradient).
    old_logp: (N, T) log pi_old (behaviour policy), no gradient.
    advantages: (N,) one advantage per completion.
    mask: (N, T) 1 where a token is a completion token that counts, 0 on padding.
    ref_logp: (N, T) log pi_ref; required when beta > 0.
    importance_weights: optional (N, T) non-negative weights on the policy-gradient
        term (e.g. truncated pi_old / pi_sampler), no gradient.
    num_sequences / num_tokens: the aggregation's normalisers, defaulting to this
        batch's N and mask.sum(); pass the totals of the whole optimizer batch
        when accumulating gradients over micro-batches.
    max_length: the "constant" aggregation's length normaliser (default T).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp")
    mask = mask.to(logp.dtype)
    objective_fn = OBJECTIVES[objective]
    aggregate = AGGREGATIONS[aggregation]
    normalizers = {
        "num_sequences": float(logp.shape[0]) if num_sequences is None else num_sequences,
        "num_tokens": mask.sum().detach() if num_tokens is None else num_tokens,
        "max_length": logp.shape[1] if max_length is None else max_length,
    }

    per_token_pg, ratio = objective_fn(
        logp, old_logp, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    if importance_weights is not None:
        per_token_pg = per_token_pg * importance_weights
    policy_loss = aggregate(per_token_pg, mask, **normalizers)
    if beta > 0:
        kl = k3_kl(logp, ref_logp)
        loss = policy_loss + beta * aggregate(kl, mask, **normalizers)
    else:
        kl = torch.zeros_like(logp)
        loss = policy_loss

    with torch.no_grad():
        adv = advantages.unsqueeze(1)
        clip_low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        clip_high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        return LossOutput(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=masked_mean(kl.detach(), mask),
            clip_low=masked_mean(clip_low, mask),
            clip_high=masked_mean(clip_high, mask),
            ratio=masked_mean(ratio.detach(), mask),
        )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over positions where `mask` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


__all__ = [
    "AGGREGATIONS",
    "OBJECTIVES",
    "LossOutput",
    "grpo_loss",
    "k3_kl",
    "masked_mean",
]
