"""Attention over packed rows, one sequence at a time: no query ever scores another sequence's keys.

A packed row (policy/attention.py `PackedSequences`) holds several sequences, and
a dense block-diagonal mask makes attention over it cost T^2 per row however
short its sequences are. `SegmentLayout` regroups the row's tokens one sequence
per batch entry instead, each entry holding its segment's tokens as queries and
its shared prefix (if any) plus its segment's tokens as keys:

    row      P P P | a a | b b b            prompt P, completions a and b continuing it
    entries  queries P P P   keys P P P
             queries a a     keys P P P a a
             queries b b b   keys P P P b b b

so a sequence costs (its length) x (prefix + its length), the prefix's keys
and values are copied once per segment that continues it (its queries, MLP
and everything else stay computed once). Attention runs as one batched
scaled-dot-product call over (N sequences, Q, K), with Q and K the longest
segment and the longest prefix + segment; the gathers are `index_select`,
whose backward is a plain index-add.

It pays when rows are long next to their sequences. Each batch entry costs
the fused kernel about as much as a thousand more query-key pairs (measured
on CPU), and the gathers cost too, so `pays_off` asks for half the modeled
work of the dense mask: N (Q K + ENTRY_PAIRS) <= B T^2 / 2. On 2 CPU cores,
tiny policy, training forward + backward: rows of 1024 tokens holding
samples of about 128 tokens ran 1.35-1.7x faster than under the dense mask,
a GRPO micro-batch's shared-prompt rows (~500 tokens, 36 sequences) 1.03x,
1.16x with every completion at the cap (docs/benchmarks.md).

The result equals attention under `build_attention_mask`'s dense mask up to
fp32 summation order: the same keys, the same causal order, a padding key
seen only by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from r1kit.policy.attention import PackedSequences

ENTRY_PAIRS = 1024  # what one batch entry costs the attention kernel, in query-key pairs


@dataclass(frozen=True)
class SegmentLayout:
    """Where each token of packed rows (B, T) sits when the rows are regrouped one sequence per entry.

    query_index (N * Q,): the flat token (b * T + t) of each query slot; empty slots repeat
        their entry's first token.
    key_index (N * K,): the flat token of each key slot: the prefix's tokens, then the segment's.
    slot (B * T,): the query slot of each token.
    mask (N, 1, Q, K) bool: the keys each query slot sees (causal, within its sequence, real
        keys or itself); empty query slots see the entry's keys, so no row of it is empty.
    shape: (B, T) of the rows.
    alone (B * T,) bool or None: tokens of segments made of padding only; they are no entry's
        and each sees only itself (its attention output is its own value).
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    slot: torch.Tensor
    mask: torch.Tensor
    shape: tuple[int, int]
    alone: torch.Tensor | None = None

    @property
    def num_entries(self) -> int:
        return self.mask.shape[0]

    def pays_off(self) -> bool:
        """Whether attention this way models at most half the work of the dense (B, T, T) mask."""
        entries, _, queries, keys = self.mask.shape
        batch, length = self.shape
        return entries * (queries * keys + ENTRY_PAIRS) <= batch * length * length / 2

    @classmethod
    def from_sequences(cls, sequences: PackedSequences, attention_mask: torch.Tensor | None = None) -> SegmentLayout:
        """The layout of rows with these sequences (B, T); attention_mask (B, T), 0 on padding."""
        batch, length = sequences.segment.shape
        device = sequences.segment.device
        flat_start = sequences.segment_start.flatten()  # (B * T,)
        segment = flat_start.cumsum(0) - 1  # (B * T,) each token's segment, over all rows
        segment_first = flat_start.nonzero().squeeze(1)  # (S,) flat index of each segment's first token
        real = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.flatten().bool()
        if real is None:
            kept = torch.ones_like(segment_first, dtype=torch.bool)
        else:  # a segment of padding alone is no entry: each of its tokens sees only itself
            kept = torch.bincount(segment, weights=real.float(), minlength=segment_first.numel()) > 0  # (S,)
        if not bool(kept.any()):  # padding only: no entries
            nothing = segment.new_zeros(0)
            no_mask = torch.zeros(0, 1, 1, 1, dtype=torch.bool, device=device)
            return cls(
                nothing, nothing, torch.zeros_like(segment), no_mask, (batch, length), torch.ones_like(flat_start)
            )
        first = segment_first[kept]  # (N,)
        own_length = torch.bincount(segment, minlength=segment_first.numel())[kept]  # (N,)
        prefix_first = first - first % length + sequences.prefix_start.flatten()[first]  # (N,)
        prefix_length = sequences.prefix_length.flatten()[first]  # (N,)
        queries, keys = int(own_length.max()), int((prefix_length + own_length).max())  # host syncs

        key_slot = torch.arange(keys, device=device)  # (K,)
        in_prefix = key_slot < prefix_length[:, None]  # (N, K)
        own_key = first[:, None] + key_slot - prefix_length[:, None]
        key_index = torch.where(in_prefix, prefix_first[:, None] + key_slot, own_key)  # (N, K)
        key_valid = key_slot < (prefix_length + own_length)[:, None]  # (N, K)
        key_index = torch.where(key_valid, key_index, first[:, None])

        query_slot = torch.arange(queries, device=device)  # (Q,)
        query_index = torch.where(query_slot < own_length[:, None], first[:, None] + query_slot, first[:, None])
        # query i of an entry is its key prefix_length + i; an empty slot acts as the entry's last query
        query_key = prefix_length[:, None] + torch.minimum(query_slot, own_length[:, None] - 1)  # (N, Q)
        mask = (key_slot[None, None, :] <= query_key[:, :, None]) & key_valid[:, None, :]  # (N, Q, K)
        if real is not None:
            mask = mask & (real[key_index][:, None, :] | (key_slot[None, None, :] == query_key[:, :, None]))

        entry = (kept.cumsum(0) - 1).clamp(min=0)[segment]  # (B * T,)
        slot = entry * queries + torch.arange(batch * length, device=device) - first[entry]  # (B * T,)
        alone = None if real is None else ~kept[segment]
        if alone is not None:
            slot = torch.where(alone, 0, slot)
        return cls(query_index.flatten(), key_index.flatten(), slot, mask[:, None], (batch, length), alone)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0
    ) -> torch.Tensor:
        """q, k (B, T, n, d_qk), v (B, T, n, d_v) -> (B, T, n, d_v): each query over its own sequence's keys."""
        batch, length, heads = q.shape[:3]
        if (batch, length) != self.shape:
            raise ValueError(f"this layout is for rows of shape {self.shape}, got queries of {(batch, length)}")
        entries, _, queries, keys = self.mask.shape
        if entries == 0:  # nothing but padding
            return v

        def regroup(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
            # (B, T, n, d) -> (N, n, width, d)
            return x.flatten(0, 1).index_select(0, index).view(entries, width, heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            regroup(q, self.query_index, queries),
            regroup(k, self.key_index, keys),
            regroup(v, self.key_index, keys),
            attn_mask=self.mask,
            dropout_p=dropout_p,
            scale=scale,
        )  # (N, n, Q, d_v)
        out = out.transpose(1, 2).reshape(entries * queries, heads, -1).index_select(0, self.slot)
        if self.alone is not None:
            out = torch.where(self.alone[:, None, None], v.flatten(0, 1), out)
        return out.view(batch, length, heads, -1)
