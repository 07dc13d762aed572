"""Importance-sampling corrections for the sampler / trainer mismatch, registered by name.

The rollout engine draws completion tokens from pi_sampler (another process,
engine or precision, or the previous step's weights: --overlap); the loss
importance-samples from pi_old, the trainer's log-probs of the same weights
(grpo/loss.py). Every correction starts from the per-token ratio

    rho_it = pi_old(o_it) / pi_sampler(o_it) = exp(old_logp - sampler_logp)

and returns weights w on the policy-gradient term, (N, T) or None for w = 1, and
keep, (N,) 1 for the completions that stay in the loss, 0 for those masked out:

    none          w = 1
    token_tis     w_it = min(rho_it, C)                               truncated IS (TIS; verl rollout_is=token)
    sequence_tis  w_it = min(prod_t rho_it, C) for every token of i    (verl rollout_is=sequence)
    token_mis     w_it = rho_it if low <= rho_it <= high, else 0       masked IS (TRL's token_mask)
    icepop        token_mis under the name of IcePop (Ling team, Ring-1T, arXiv 2510.18855),
                  whose M(k; alpha, beta) is exactly that; the report's [alpha, beta] = [0.5, 5]
    sequence_mis  keep_i = 1 if low <= exp(mean_t log rho_it) <= high, w = 1: completions whose
                  geometric-mean ratio leaves the bounds are dropped (verl rollout_rs=geometric)

C is importance_cap, [low, high] importance_bounds (GRPOConfig). Weights and keep
carry no gradient. Differences from TRL's vllm_importance_sampling_mode:
token_truncate and sequence_truncate also clip from below at C_min when it is
set (here never); sequence_mask bounds the product of the ratios, not their
geometric mean, and weights the completions it keeps by that product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1kit.grpo.registry import Registry

# fn(old_logp, sampler_logp, mask, *, cap, bounds) -> (weights (N, T) or None, keep (N,) float)
IS_CORRECTIONS: Registry[Callable[..., tuple[Tensor | None, Tensor]]] = Registry("importance correction")


def log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho = old_logp - sampler_logp on completion tokens, 0 on padding; (N, T)."""
    return (old_logp - sampler_logp) * mask


def keep_all(mask: Tensor) -> Tensor:
    """(N,) float ones: every completion stays in the loss."""
    return torch.ones(mask.shape[0], device=mask.device)


@IS_CORRECTIONS.register("none")
def no_correction(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float, bounds: tuple[float, float]
) -> tuple[Tensor | None, Tensor]:
    """No weights and no mask: the sampler's tokens are taken as pi_old's."""
    return None, keep_all(mask)


@IS_CORRECTIONS.register("token_tis")
def token_truncated(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float, bounds: tuple[float, float]
) -> tuple[Tensor | None, Tensor]:
    """w_it = min(rho_it, cap) per token; (weights (N, T), ones (N,))."""
    return torch.exp(log_ratio(old_logp, sampler_logp, mask)).clamp(max=cap), keep_all(mask)


@IS_CORRECTIONS.register("sequence_tis")
def sequence_truncated(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float, bounds: tuple[float, float]
) -> tuple[Tensor | None, Tensor]:
    """w_it = min(prod_t rho_it, cap) = min(exp(sum_t log rho_it), cap) for all tokens of i; (weights (N, T), ones)."""
    sequence_ratio = torch.exp(log_ratio(old_logp, sampler_logp, mask).sum(dim=1)).clamp(max=cap)  # (N,)
    return sequence_ratio.unsqueeze(1).expand_as(mask), keep_all(mask)


@IS_CORRECTIONS.register("token_mis")
@IS_CORRECTIONS.register("icepop")
def token_masked(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float, bounds: tuple[float, float]
) -> tuple[Tensor | None, Tensor]:
    """w_it = rho_it where low <= rho_it <= high, else 0 (the token leaves the gradient); (weights (N, T), ones)."""
    low, high = bounds
    ratio = torch.exp(log_ratio(old_logp, sampler_logp, mask))
    inside = (ratio >= low) & (ratio <= high)
    return torch.where(inside, ratio, torch.zeros_like(ratio)), keep_all(mask)


@IS_CORRECTIONS.register("sequence_mis")
def sequence_masked(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float, bounds: tuple[float, float]
) -> tuple[Tensor | None, Tensor]:
    """keep_i = 1 where low <= exp(mean_t log rho_it) <= high, else 0; no weights (None, keep (N,))."""
    low, high = bounds
    mean_log_ratio = log_ratio(old_logp, sampler_logp, mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    geometric_mean = torch.exp(mean_log_ratio)
    return None, ((geometric_mean >= low) & (geometric_mean <= high)).float()


__all__ = ["IS_CORRECTIONS"]
