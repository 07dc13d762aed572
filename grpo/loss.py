"""The GRPO objective and its variants, as pure tensor functions.

DeepSeekMath's GRPO maximises (Shao et al. 2024, eq. 3)

    J = 1/G sum_i 1/|o_i| sum_t { min(rho_it A_it, clip(rho_it, 1 - eps, 1 + eps) A_it) - beta D_KL }

with rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t) and the
unbiased, always non-negative k3 estimator of KL(pi_theta || pi_ref) (eq. 4)

    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 = exp(ref - logp) - (ref - logp) - 1.

The loss is -J. It is computed in registered pieces:

- a per-token objective, returning the per-token loss and the ratio it used:
    "grpo": the clipped token ratio above, with an optional separate upper clip
        eps_high as in DAPO's clip-higher;
    "gspo": the sequence ratio s_i = exp(mean_t(logp - old)) of Zheng et al. 2025,
        clipped like rho and shared by all tokens of a sequence;
    "cispo": MiniMax-M1's (arXiv 2506.13585) -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi_theta:
        the clipped ratio is a stop-gradient weight, so every token keeps a gradient
        through log pi_theta (eps_low >= 1: no lower bound, as the paper ran it);
    "sapo": Qwen's SAPO (arXiv 2511.20347): -f(rho) A with the soft gate
        f(rho) = sigmoid(tau (rho - 1)) 4 / tau in place of the hard clip, tau = tau_pos
        for A > 0 and tau_neg otherwise (f(1) = 2 / tau, f'(1) = 1: on-policy its gradient is GRPO's);
    "gmpo": GMPO (arXiv 2507.20673): -A_i exp(1/|o_i| sum_t c_it), the geometric
        mean of the token ratios clipped in log space, c_it = sgn(A_i) min(sgn(A_i) log rho_it,
        sgn(A_i) clip(log rho_it, -eps_low, eps_high)) (the paper's eps = 0.4: rho in [e^-0.4, e^0.4]);
  the sequence objectives (gspo, gmpo) give every token of o_i the sequence's loss,
  so "sequence_mean" below is their paper's 1/G sum_i, "token_mean" weights each
  sequence by its length and "constant" by |o_i| / max_length;
- a KL estimator ("k3": DeepSeekMath's above; "k3_unbiased": DeepSeek-V3.2's
  rho k3 (arXiv 2512.02556, "unbiased KL estimate"), unbiased when tokens come from pi_old; the
  ratio keeps its gradient, as in the paper and TRL's use_bias_correction_kl);
- an aggregation ("sequence_mean": the paper's mean over each sequence's tokens,
  then over sequences; "token_mean": DAPO's mean over all tokens of the batch;
  "constant": Dr. GRPO's sum over tokens divided by num_sequences *
  max_completion_length).

Departures from the papers: none in the formulas. Optionally the policy-gradient
term is multiplied by per-token importance weights (grpo/importance.py), which
correct for the mismatch between the sampler that generated the tokens and the
trainer's behaviour policy, and by DeepSeek-V3.2's off-policy sequence mask (eq. 9):
sequences with A_i < 0 whose mean_t(log pi_sampler - log pi_theta) exceeds delta
leave the policy-gradient term (they keep their KL term and count in the normalisers).
Without them the loss is the paper's. Normalisers are passed in explicitly so
that gradient accumulation over micro-batches (and data parallelism) reproduces
the full-batch loss exactly. Nothing here calls `.item()`: statistics stay on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from r1kit.grpo.registry import Registry


@dataclass(frozen=True)
class TrustRegion:
    """How far an objective lets the ratio move: the clip range [1 - epsilon_low, 1 + epsilon_high]
    (gmpo: of the log-ratio, [-epsilon_low, epsilon_high]) and SAPO's gate temperatures for
    positive / other advantages. Each objective reads what it needs."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    temperature_pos: float = 1.0
    temperature_neg: float = 1.05


# fn(logp, old_logp, advantages, mask, trust: TrustRegion) -> (per-token loss, ratio), (N, T) each
OBJECTIVES: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry("objective")
# fn(logp, ref_logp, old_logp) -> (N, T) per-token estimate of KL(pi_theta || pi_ref)
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("KL estimator")
# fn(per_token (N, T), mask (N, T), *, num_sequences, num_tokens, max_length) -> scalar
AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("aggregation")


@KL_ESTIMATORS.register("k3")
def k3_kl(logp: Tensor, ref_logp: Tensor, old_logp: Tensor | None = None) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0).

    old_logp is not used (k3 assumes the tokens come from pi_theta); it is accepted so
    that every KL estimator is called alike.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@KL_ESTIMATORS.register("k3_unbiased")
def importance_weighted_k3_kl(logp: Tensor, ref_logp: Tensor, old_logp: Tensor) -> Tensor:
    """DeepSeek-V3.2's unbiased KL estimate for tokens drawn from pi_old: (pi_theta / pi_old) * k3, (N, T).

    The ratio keeps its gradient (the paper's estimator; TRL's use_bias_correction_kl=True),
    so even on-policy, where its value is 1, the KL gradient differs from plain k3's.
    """
    return torch.exp(logp - old_logp) * k3_kl(logp, ref_logp)


@OBJECTIVES.register("grpo")
def clipped_token_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    trust: TrustRegion,
) -> tuple[Tensor, Tensor]:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token; returns (loss, rho), both (N, T)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - trust.epsilon_low, 1 + trust.epsilon_high) * adv
    return -torch.minimum(unclipped, clipped), ratio


@OBJECTIVES.register("gspo")
def clipped_sequence_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    trust: TrustRegion,
) -> tuple[Tensor, Tensor]:
    """GSPO: the token ratio of `grpo` replaced by s_i = exp(mean_t(logp - old_logp)) for every token of i.

    The gradient flows through every token's logp via the mean (GSPO-token with
    uniform token advantages). Returns (loss, s) of shape (N, T).
    """
    lengths = mask.sum(dim=1).clamp(min=1)
    seq_log_ratio = ((logp - old_logp) * mask).sum(dim=1) / lengths  # (N,)
    ratio = torch.exp(seq_log_ratio).unsqueeze(1).expand_as(logp)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - trust.epsilon_low, 1 + trust.epsilon_high) * adv
    return -torch.minimum(ratio * adv, clipped), ratio


@OBJECTIVES.register("cispo")
def clipped_weight_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    trust: TrustRegion,
) -> tuple[Tensor, Tensor]:
    """CISPO: -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A logp per token; returns (loss, rho), both (N, T).

    The clip bounds the weight, never the gradient: every token's gradient is
    -w A grad(logp). TRL's loss_type="cispo" caps rho at its epsilon_high (no lower
    bound): ours with epsilon_low >= 1 and epsilon_high = TRL's epsilon_high - 1.
    """
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, 1 - trust.epsilon_low, 1 + trust.epsilon_high).detach()
    return -weight * advantages.unsqueeze(1) * logp, ratio


@OBJECTIVES.register("sapo")
def soft_gate_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    trust: TrustRegion,
) -> tuple[Tensor, Tensor]:
    """SAPO: -sigmoid(tau (rho - 1)) 4 / tau A per token, tau = temperature_pos if A > 0 else temperature_neg.

    The gate's gradient 4 sigmoid (1 - sigmoid) is 1 at rho = 1 and decays smoothly
    off-policy instead of dropping to 0 at a clip bound. Returns (loss, rho), both (N, T).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    tau = torch.where(adv > 0, trust.temperature_pos, trust.temperature_neg)  # (N, 1)
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    return -gate * adv, ratio


@OBJECTIVES.register("gmpo")
def geometric_mean_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    trust: TrustRegion,
) -> tuple[Tensor, Tensor]:
    """GMPO: -A_i exp(mean_t c_it), c_it the log token ratio clipped to [-eps_low, eps_high] where it helps.

    c_it = sgn(A_i) min(sgn(A_i) log rho_it, sgn(A_i) clip(log rho_it, -eps_low, eps_high)):
    for A > 0 only the upper clip binds, for A < 0 only the lower one (PPO's
    pessimism, per token, in log space). Every token of i carries the sequence's
    loss. Returns (loss, rho), both (N, T), rho the unclipped token ratio.
    """
    log_ratio = logp - old_logp
    sign = torch.sign(advantages).unsqueeze(1)  # (N, 1)
    clipped = torch.clamp(log_ratio, -trust.epsilon_low, trust.epsilon_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)  # (N, T)
    lengths = mask.sum(dim=1).clamp(min=1)
    geometric_mean = torch.exp((pessimistic * mask).sum(dim=1) / lengths)  # (N,)
    loss = -(advantages * geometric_mean).unsqueeze(1).expand_as(logp)
    return loss, torch.exp(log_ratio)


def off_policy_sequence_mask(
    logp: Tensor, sampler_logp: Tensor, advantages: Tensor, mask: Tensor, *, threshold: float
) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (eq. 9): (N,) float, 0 for the sequences it drops.

    Sequence i is dropped when A_i < 0 and mean_t(log pi_sampler - log pi_theta) > threshold,
    the mean over its tokens of a (k1) estimate of KL(pi_sampler || pi_theta). logp (N, T)
    is pi_theta's (used without gradient), sampler_logp (N, T) the sampler's.
    """
    kl = ((sampler_logp - logp.detach()) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return ((advantages >= 0) | (kl <= threshold)).to(mask.dtype)


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
        where the clip changed the objective (negative / positive advantage), bounds
        1 - eps_low and 1 + eps_high (gmpo clips at e^-eps_low, e^eps_high and sapo
        not at all: for them, the fraction of tokens outside that trust region).
    ratio: mean importance ratio rho (gspo: the sequence ratio).
    off_policy_masked: fraction of sequences the off-policy mask dropped (0 when off).
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    clip_low: Tensor
    clip_high: Tensor
    ratio: Tensor
    off_policy_masked: Tensor


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
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    objective: str = "grpo",
    aggregation: str = "sequence_mean",
    kl_estimator: str = "k3",
    importance_weights: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    off_policy_threshold: float | None = None,
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
        term (e.g. truncated pi_old / pi_sampler, grpo/importance.py), no gradient.
    sampler_logp: (N, T) log pi_sampler, for the off-policy mask (default old_logp).
    off_policy_threshold: DeepSeek-V3.2's delta; None disables the off-policy mask.
    sapo_temperature_pos / _neg: SAPO's tau for A > 0 / A <= 0.
    num_sequences / num_tokens: the aggregation's normalisers, defaulting to this
        batch's N and mask.sum(); pass the totals of the whole optimizer batch
        when accumulating gradients over micro-batches.
    max_length: the "constant" aggregation's length normaliser (default T).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp")
    mask = mask.to(logp.dtype)
    objective_fn = OBJECTIVES[objective]
    kl_fn = KL_ESTIMATORS[kl_estimator]
    aggregate = AGGREGATIONS[aggregation]
    normalizers = {
        "num_sequences": float(logp.shape[0]) if num_sequences is None else num_sequences,
        "num_tokens": mask.sum().detach() if num_tokens is None else num_tokens,
        "max_length": logp.shape[1] if max_length is None else max_length,
    }

    trust = TrustRegion(epsilon_low, epsilon_high, sapo_temperature_pos, sapo_temperature_neg)
    per_token_pg, ratio = objective_fn(logp, old_logp, advantages, mask, trust)
    if importance_weights is not None:
        per_token_pg = per_token_pg * importance_weights
    keep = torch.ones_like(advantages, dtype=mask.dtype)
    if off_policy_threshold is not None:
        sampler = old_logp if sampler_logp is None else sampler_logp
        keep = off_policy_sequence_mask(logp, sampler, advantages, mask, threshold=off_policy_threshold)
        per_token_pg = per_token_pg * keep.unsqueeze(1)
    policy_loss = aggregate(per_token_pg, mask, **normalizers)
    if beta > 0:
        kl = kl_fn(logp, ref_logp, old_logp)
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
            off_policy_masked=1 - keep.mean(),
        )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over positions where `mask` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "OBJECTIVES",
    "LossOutput",
    "TrustRegion",
    "grpo_loss",
    "importance_weighted_k3_kl",
    "k3_kl",
    "masked_mean",
    "off_policy_sequence_mask",
]
