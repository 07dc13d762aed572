"""Next-token sampling: temperature, nucleus (top-p), and the sampler's log-probs.

The log-prob reported for a drawn token is taken from the temperature-scaled
distribution before top-p truncation, the distribution the trainer recomputes
(it cannot cheaply reproduce the truncation). With temperature 0 the engine is
greedy and reports log-probs of the untempered distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_p_filter(logprobs: Tensor, top_p: float) -> Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches `top_p`.

    logprobs: (R, V) normalised log-probs. Returns (R, V); the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logprobs
    sorted_logprobs, order = torch.sort(logprobs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_logprobs.exp(), dim=-1) - sorted_logprobs.exp()
    drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and is never dropped
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf"))


def sample_next_tokens(
    logits: Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from logits (R, V).

    Returns (tokens (R,) int64, logprobs (R,) float32), the log-probs under the
    temperature-scaled distribution (untempered when temperature == 0, greedy).
    """
    logits = logits.float()
    if temperature == 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logprobs.argmax(dim=-1)
    else:
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        probs = top_p_filter(logprobs, top_p).exp()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
