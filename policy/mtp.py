"""Multi-token prediction (DeepSeek-V3 section 2.2): D sequential modules predicting tokens 2..D+1 ahead.

Module k (k = 1..D) at position i combines the previous depth's representation
h_i^{k-1} with the embedding of token t_{i+k}, concatenated in the order of the
released checkpoints (embedding first):

    h'_i^k = W_k [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h_i^{k-1})]     (eh_proj, enorm, hnorm)
    h_i^k  = TRM_k(h'_i^k)                                           (a full decoder layer, MoE)
    P_i^k  = softmax(OutHead(RMSNorm_k(h_i^k)))   predicts t_{i+k+1}  (shared_head.norm)

Embedding and output head are the main model's (shared, as in the paper).
h^0 is the main model's final hidden state *after* its final norm, the
`last_hidden_state` every caller already has (and what vLLM and SGLang feed the
released MTP weights for speculative decoding); deeper modules get h^{k-1}
before its shared-head norm. Positions use the main model's position ids.

Loss, with loss_mask[b, j] True when token j of row b is a training target:

    CE_k = mean over {(b, i): loss_mask[b, i + k + 1], position i is not padding
                              and token i + k + 1 is in the same packed sample as i}
           of -log P_i^k(t_{i+k+1})
    L_MTP = (lambda / D) * sum_k CE_k

i.e. at depth k the inputs are shifted left by k and the targets by k + 1; the
last k + 1 positions of every row have no target and are ignored (their
garbage inputs cannot leak backwards through causal attention). Logits are
computed only at target positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.policy.attention import AttentionMask
from r1kit.policy.cache import LatentCache
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.layers import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth around `block`, a decoder layer built by the model (its MoE variant)."""

    def __init__(self, config: DeepseekV3Config, block: nn.Module) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.norm = RMSNorm(hidden, eps)

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        token_mask: torch.Tensor | None,
        cache: LatentCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """hidden, next_embeds (B, T, H) -> h^k (B, T, H), the block's balance loss and expert load.

        cache: a latent cache with a slot for the block's layer index (speculative drafting,
        rollout/speculative.py); the block's attention then also reads the cached positions.
        """
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        hidden, aux_loss, load, _ = self.block(x, rope, mask, cache=cache, token_mask=token_mask)
        return hidden, aux_loss, load


def shift_left(x: torch.Tensor, k: int, fill: int | bool = 0) -> torch.Tensor:
    """x (B, T) moved k positions left, the last k columns set to `fill`: out[:, i] = x[:, i + k]."""
    out = torch.full_like(x, fill)
    if k < x.shape[1]:
        out[:, : x.shape[1] - k] = x[:, k:]
    return out


def mtp_loss(
    modules: nn.ModuleList,
    hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    embed: nn.Embedding,
    head: nn.Module,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: AttentionMask,
    attention_mask: torch.Tensor | None,
    weight: float,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(lambda / D) * sum_k CE_k and each module's expert load (None outside training).

    hidden_states (B, T, H): the main model's final (normed) hidden states;
    input_ids (B, T); loss_mask (B, T) bool targets; rope cos/sin (B, T, d_r/2)
    and mask as built for the main forward; attention_mask (B, T) or None;
    sequence_ids (B, T): the packed sample of each token (`packed_sequence_ids`), or None.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    loss_mask = loss_mask.bool()
    hidden, total, loads = hidden_states, hidden_states.new_zeros((), dtype=torch.float32), []
    for depth, module in enumerate(modules, start=1):
        next_embeds = embed(shift_left(input_ids, depth))
        token_mask = real & shift_left(real, depth, fill=False)
        if sequence_ids is not None:  # packed rows: the embedded token must be of the same sample
            token_mask = token_mask & (shift_left(sequence_ids, depth, fill=-1) == sequence_ids)
        hidden, _, load = module(hidden, next_embeds, rope, mask, token_mask)
        loads.append(load)
        # position i predicts token i + depth + 1, and only from a real (non-padding) position
        targets = shift_left(loss_mask, depth + 1, fill=False) & real  # (B, T)
        if sequence_ids is not None:  # packed rows: never across a sample boundary
            targets = targets & (shift_left(sequence_ids, depth + 1, fill=-1) == sequence_ids)
        logits = head(module.norm(hidden[targets])).float()  # (N_targets, V)
        labels = shift_left(input_ids, depth + 1)[targets]
        # with no target the zero term still keeps every MTP parameter in the graph
        total = total + (F.cross_entropy(logits, labels) if labels.numel() > 0 else logits.sum() * 0.0)
    return total * (weight / len(modules)), loads
