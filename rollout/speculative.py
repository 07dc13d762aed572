"""MTP self-speculative decoding: the policy's own MTP module drafts, the main model verifies.

One decoding round for a batch row whose last sampled token x has not been read yet:

1. draft: the first MTP module (policy/mtp.py) drafts d_1 from the main model's
   last hidden state and x, then d_2 .. d_k from its own output and the previous
   draft (one module reused, as vLLM runs DeepSeek-V3's single MTP layer for
   k > 1); each d_j ~ q_j, the draft logits processed exactly as the target's
   (temperature, min-p, top-k, top-p);
2. verify: one main-model forward over [x, d_1 .. d_k] gives the target
   distributions p_1 .. p_{k+1} (p_j follows d_{j-1});
3. accept (Leviathan et al. 2023, Chen et al. 2023): d_j is kept with probability
   min(1, p_j(d_j) / q_j(d_j)) while every earlier draft was kept; at the first
   rejection a token is drawn from the residual max(0, p_j - q_j) (renormalised),
   after k acceptances a bonus token from p_{k+1}. Every emitted token is then
   distributed exactly as p, so samples come from the target at any temperature
   and truncation, and the reported log-prob of a token is its target log p.
   Greedy decoding (temperature 0) accepts d_j iff it is the target's argmax, so
   the output equals plain greedy decoding.

Rows accept different numbers of drafts, yet the batch's caches stay one
rectangle: every round appends k + 1 columns to the main cache and masks the
columns of rejected drafts (attention_mask 0), and positions count only real
tokens. The MTP module keeps its own latent cache the same way: each round it
reads, for every newly confirmed token, the main hidden state before it and the
token (a + 1 columns, padded to k + 1), and the columns of its k - 1 recursive
draft steps are masked again once the round's drafts are made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r1kit.policy.attention import build_attention_mask
from r1kit.policy.cache import LatentCache
from r1kit.rollout.sampling import draw, kept_sets, processed_logprobs
from r1kit.rollout.token_sets import TokenSets


@dataclass
class VerifiedTokens:
    """What one verification round emits per row.

    tokens: (R, k + 1) int64, the first `counts` entries emitted (accepted drafts,
        then the residual or bonus token), -1 after them.
    logprobs: (R, k + 1) float32 target log-probs of the emitted tokens, 0 after them.
    counts: (R,) int64 in 1 .. k + 1 (= accepted drafts + 1).
    kept: with return_kept, the target's kept set at each of the R * (k + 1)
        positions (row-major), else None.
    """

    tokens: Tensor
    logprobs: Tensor
    counts: Tensor
    kept: TokenSets | None = None

    @property
    def accepted(self) -> Tensor:
        """(R,) number of drafts accepted per row."""
        return self.counts - 1


def verify_drafts(
    target_logits: Tensor,
    drafts: Tensor,
    draft_probs: Tensor | None,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
    return_kept: bool = False,
) -> VerifiedTokens:
    """Speculative sampling of one round (see the module docstring).

    target_logits: (R, k + 1, V), the main model's logits after reading [x, d_1 .. d_k].
    drafts: (R, k) drafted tokens (k may be 0: plain sampling from p_1).
    draft_probs: (R, k, V) the processed draft distributions q_j the drafts were drawn
        from (unused and may be None at temperature 0).
    """
    rows, width, vocab = target_logits.shape
    k = width - 1
    logp, keep = processed_logprobs(
        target_logits.reshape(rows * width, vocab), temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p
    )
    logp = logp.view(rows, width, vocab)
    columns = torch.arange(width, device=logp.device)
    row_index = torch.arange(rows, device=logp.device)
    if temperature == 0:
        choice = logp.argmax(dim=-1)  # (R, k + 1)
        accepted = (drafts == choice[:, :k]).long().cumprod(dim=-1).sum(dim=-1)
        last = choice[row_index, accepted]
    else:
        probs = logp.exp()
        if k > 0:
            p_draft = probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (R, k)
            q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            uniform = torch.rand((rows, k), generator=generator, device=logp.device)
            accepted = (uniform * q_draft < p_draft).long().cumprod(dim=-1).sum(dim=-1)  # u < p / q
        else:
            accepted = torch.zeros(rows, dtype=torch.long, device=logp.device)
        target = probs[row_index, accepted]  # (R, V): p at the first rejected draft, or p_{k+1}
        if k > 0:
            drafted = torch.cat((draft_probs, draft_probs.new_zeros(rows, 1, vocab)), dim=1)[row_index, accepted]
            residual = (target - drafted).clamp(min=0)
            empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q where a draft was rejected: round-off only
            target = torch.where(empty, target, residual)
        last = draw(target, generator)
    tokens = torch.full((rows, width), -1, dtype=torch.long, device=logp.device)
    tokens[:, :k] = torch.where(columns[:k] < accepted.unsqueeze(-1), drafts, -1)
    tokens[row_index, accepted] = last
    emitted = columns < accepted.unsqueeze(-1) + 1
    logprobs = logp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~emitted, 0.0)
    kept = kept_sets(keep, rows * width, logp.device) if return_kept else None
    return VerifiedTokens(tokens, logprobs, accepted + 1, kept)


class MTPDrafter:
    """Drafts tokens with the first MTP module of a DeepSeek-V3 policy, over its own latent cache.

    model: a `DeepseekV3ForCausalLM` with at least one MTP module.
    capacity: cache columns to allocate up front (the cache grows past them if needed).
    """

    def __init__(self, model: nn.Module, capacity: int) -> None:
        if len(getattr(model, "mtp", ())) == 0:
            raise ValueError(f"MTP drafting needs a policy with MTP modules; {type(model).__name__} has none")
        self.model, self.module = model, model.mtp[0]
        layer = self.module.block.self_attn.layer_idx
        self.cache = LatentCache(layer + 1, capacity=capacity)
        self.capacity = capacity
        self.attention_mask: Tensor | None = None  # (R, columns) long, 0 on padding and discarded columns

    def read(self, hidden: Tensor, next_tokens: Tensor, valid: Tensor, positions: Tensor) -> Tensor:
        """Appends the MTP entries of m new columns; returns the module's output (R, m, H).

        hidden (R, m, H): the main model's last hidden state at each position; next_tokens
        (R, m): the token after it; valid (R, m) bool: the column holds a real position
        (masked for every later query otherwise); positions (R, m).
        """
        new = next_tokens.shape[1]
        column_mask = valid.long()
        if self.attention_mask is None:
            self.attention_mask = column_mask
        else:
            self.attention_mask = torch.cat((self.attention_mask, column_mask), dim=1)
        past = self.attention_mask.shape[1] - new
        mask = build_attention_mask(self.attention_mask, past, new, positions)
        rope = self.model.model.rotary_emb(positions, hidden.dtype)
        embeds = self.model.model.embed_tokens(next_tokens.clamp(min=0))
        out, _, _ = self.module(hidden, embeds, rope, mask, valid, cache=self.cache)
        return out

    def draft(
        self,
        hidden: Tensor,
        next_tokens: Tensor,
        valid: Tensor,
        positions: Tensor,
        *,
        num_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Reads the newly confirmed columns (as `read`), then drafts `num_tokens` tokens after the last
        valid one of each row: returns drafts (R, k) and their processed distributions (R, k, V) (None
        at temperature 0). The recursive steps' columns are masked once the drafts are made."""
        out = self.read(hidden, next_tokens, valid, positions)
        last = valid.long().cumsum(dim=1).argmax(dim=1)  # (R,) last valid column
        row_index = torch.arange(len(last), device=last.device)
        state, position = out[row_index, last], positions[row_index, last]  # (R, H), (R,)
        drafts, probs = [], []
        for step in range(num_tokens):
            if step > 0:  # reuse the module on its own output and the previous draft, one position on
                position = position + 1
                state = self.read(
                    state.unsqueeze(1), drafts[-1].unsqueeze(1), torch.ones_like(valid[:, :1]), position.unsqueeze(1)
                )[:, 0]
            logits = self.model.lm_head(self.module.norm(state))
            logp, _ = processed_logprobs(logits, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
            if temperature == 0:
                drafts.append(logp.argmax(dim=-1))
            else:
                probs.append(logp.exp())
                drafts.append(draw(probs[-1], generator))
        if num_tokens > 1:
            self.attention_mask[:, -(num_tokens - 1) :] = 0
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None

    def select(self, rows: Tensor) -> None:
        """Keeps (and reorders) batch rows `rows` (R',)."""
        self.cache.select(rows)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[rows]
