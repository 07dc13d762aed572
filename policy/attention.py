"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with an expanded and an absorbed path.

Per token h (hidden), with n heads, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim,
d_v = v_head_dim, c = kv_lora_rank:

    c_Q = RMSNorm(W_DQ h)                        (q_lora_rank)   [W_Q h when q_lora_rank is None]
    [q_N; q_R] = W_UQ c_Q                        (n, d_n + d_r);  q_R <- RoPE(q_R)
    [c_KV; k_R] = W_DKV h                        (c + d_r);       c_KV <- RMSNorm(c_KV), k_R <- RoPE(k_R)
    [k_N; v] = W_UKV c_KV                        (n, d_n + d_v)   (kv_b_proj)
    o_i = softmax_j(scale * (q_N,i . k_N,j + q_R,i . k_R,j)) v_j;   out = W_O [o_1 .. o_n]

Expanded path (training, prefill): materialise k_N and v for every cached token
and run scaled-dot-product attention over (d_n + d_r)-dim keys.

Absorbed path (decoding): fold W_UK into the query and W_UV into the output,

    q_C = q_N W_UK            "bthd,hdc->bhtc"    scores = [q_C; q_R] . [c_KV; k_R]
    o_C = softmax(scores) c_KV                     o = o_C W_UV^T  "bhtc,hvc->bthv"

so attention reads only the cached (c + d_r) values per token (one shared
"head" of width 576 for V3) and never expands the cache. The model uses the
absorbed path whenever the cache already holds earlier tokens, unless
`absorb_decode` is off (`DeepseekV3ForCausalLM.set_mla_decode("expanded")`):
then decoding re-expands the cache every step, as the training forward does.
That costs compute but rounds like the trainer: in bf16 it cuts the sampler /
trainer log-prob gap about tenfold (benchmarks/bench_consistency.py).

The softmax scale includes YaRN's mscale^2 correction (see policy/rope.py). All
five projections are plain `nn.Linear`, or `FP8Linear` under FP8 training.

Under FP8 the expanded path multiplies E4M3-rounded operands inside kv_b_proj:
the latent rounded per 1 x 128 tile along c, W_UKV per 128 x 128 block. The
absorbed path uses exactly those rounded operands (`FP8Linear.rounded_input` on
the cached latents, `rounded_weight` for W_UK and W_UV), never the master weight,
so decoding reproduces the training forward up to fp32 summation order and the
rollout log-probs are those the trainer computes. The cache keeps the latents
unrounded; rounding them costs one pass over the cache per step and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.policy.cache import LatentCache
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.fp8_linear import FP8Linear
from r1kit.policy.layers import RMSNorm
from r1kit.policy.rope import apply_rope, softmax_scale
from r1kit.policy.segment_attention import SegmentLayout

AttentionMask = torch.Tensor | SegmentLayout | None  # what `attention_layout` returns


def packed_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the segment each token belongs to, (B, T) from position_ids (B, T).

    Several samples packed into one row restart their positions; a new segment
    starts wherever a position does not follow the previous one by +1 (the rule
    of transformers' `find_packed_sequence_indices`):

    >>> packed_sequence_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    tensor([[0, 0, 0, 1, 1, 2]])
    """
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (steps != 1).cumsum(dim=-1)


@dataclass(frozen=True)
class PackedSequences:
    """The sequences of packed rows, read from their position ids (B, T) and padding mask.

    A segment is a run of positions that go up by 1 (`packed_sequence_ids`). A
    segment starting at position 0 begins a sequence of its own. A segment
    starting at position s > 0 continues the row's latest earlier segment that
    started at 0 (its root) after the root's first s tokens: it is a sequence
    made of that shared prefix and itself. So one prompt can carry several
    completions in one row, the prompt's tokens computed once:

        positions  0 1 2 | 3 4 | 3 4 5      prompt (3 tokens) + completion a, then completion b
        sequences  [0 1 2 3 4] and [0 1 2] + [3 4 5]

    A segment starting at s > 0 with no root before it in its row (or a root
    shorter than s, for the missing part), or whose first token is padding, has
    no prefix: right padding numbered by cumsum repeats the last position and
    stays a block of its own.

    segment (B, T): the token's segment, 0, 1, ... within its row.
    prefix_start (B, T), prefix_length (B, T): the row span [start, start + length)
        of the prefix the token's segment continues; length 0 where it continues none.
    segment_start (B, T) bool: True on the first token of each segment.
    shares_prefixes: whether any segment continues a prefix.
    """

    segment: torch.Tensor
    prefix_start: torch.Tensor
    prefix_length: torch.Tensor
    segment_start: torch.Tensor
    shares_prefixes: bool

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PackedSequences:
        """The sequences of rows with these position_ids (B or 1, T); attention_mask (B, T), 0 on padding."""
        if attention_mask is not None:
            position_ids = position_ids.expand(attention_mask.shape[0], -1)
        batch, length = position_ids.shape
        index = torch.arange(length, device=position_ids.device).expand(batch, -1)  # (B, T)
        segment = packed_sequence_ids(position_ids)
        starts = torch.diff(segment, prepend=segment[:, :1] - 1, dim=-1) != 0  # (B, T): the first token too
        own_start = torch.where(starts, index, 0).cummax(dim=-1).values  # row index of the segment's first token
        start_position = position_ids.gather(1, own_start)
        root = torch.where(starts & (position_ids == 0), index, -1).cummax(dim=-1).values  # -1: no root yet
        segment_lengths = torch.zeros_like(segment).scatter_add_(1, segment, torch.ones_like(segment))
        root_length = segment_lengths.gather(1, segment.gather(1, root.clamp(min=0)))
        continues = (start_position > 0) & (root >= 0)
        if attention_mask is not None:
            continues = continues & attention_mask.bool().gather(1, own_start)
        return cls(
            segment=segment,
            prefix_start=torch.where(continues, root, 0),
            prefix_length=torch.where(continues, torch.minimum(start_position, root_length), 0),
            segment_start=starts,
            shares_prefixes=bool(continues.any()),
        )

    def attendable(self) -> torch.Tensor:
        """(B, 1, T, T) bool: key s lies in query t's sequence (its segment or its prefix); not causal by itself."""
        keys = torch.arange(self.segment.shape[1], device=self.segment.device)
        allowed = self.segment[:, :, None] == self.segment[:, None, :]  # (B, T, T)
        if self.shares_prefixes:
            start = self.prefix_start[:, :, None]
            allowed = allowed | ((keys >= start) & (keys < start + self.prefix_length[:, :, None]))
        return allowed[:, None]

    def memberships(self) -> torch.Tensor:
        """(B, T) long: how many sequences each token belongs to (1, plus the segments that continue it)."""
        continuing = self.segment_start & (self.prefix_length > 0)  # (B, T)
        ones = continuing.long()
        edges = ones.new_zeros(ones.shape[0], ones.shape[1] + 1)  # +1 where a prefix starts, -1 past its end
        edges.scatter_add_(1, self.prefix_start, ones)
        edges.scatter_add_(1, self.prefix_start + self.prefix_length, -ones)
        return 1 + edges.cumsum(dim=-1)[:, :-1]

    def prefix_sums(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, T, *rest) -> (B, T, *rest): on each segment's first token, the sum of values over the
        prefix it continues; zero elsewhere (differentiable)."""
        cumulative = torch.cat((torch.zeros_like(values[:, :1]), values.cumsum(dim=1)), dim=1)  # (B, T + 1, ...)
        rest = (1,) * (values.dim() - 2)
        start = self.prefix_start.view(*self.prefix_start.shape, *rest).expand_as(values)
        end = (self.prefix_start + self.prefix_length).view(*self.prefix_start.shape, *rest).expand_as(values)
        sums = cumulative.gather(1, end) - cumulative.gather(1, start)
        first = (self.segment_start & (self.prefix_length > 0)).view(*self.segment_start.shape, *rest)
        return sums * first


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    position_ids: torch.Tensor | None = None,
    sequences: PackedSequences | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, past + T), True where query t may attend key s; None if causal order suffices.

    attention_mask: (B, past + T) with 1 for real tokens and 0 for padding (left
    or right). A query always sees its own key, so padded rows stay finite.
    position_ids: (B or 1, T) of the new tokens. With no past, they give the
    packed sequences (`PackedSequences`, or pass `sequences` built from them) and
    a token sees only earlier tokens of its own sequence: the mask is
    block-diagonal causal, plus each shared prefix for the segments continuing it.
    Contiguous positions, and left padding numbered by cumsum, leave it unchanged.
    None is returned when nothing is padded or packed and either there is no past
    (plain causal) or there is one query (it sees everything cached).
    """
    key_length = past_length + query_length
    padded = attention_mask is not None and not bool(attention_mask.all())
    sequences = _packed_sequences(attention_mask, past_length, query_length, position_ids, sequences, padded)
    if not padded and sequences is None and (past_length == 0 or query_length == 1):
        return None
    device = next((t.device for t in (attention_mask, position_ids) if t is not None), None)
    device = sequences.segment.device if sequences is not None else device
    query_pos = torch.arange(query_length, device=device) + past_length  # (T,)
    key_pos = torch.arange(key_length, device=device)  # (S,)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, T, S)
    if sequences is not None:  # no past here, so S == T
        allowed = allowed & sequences.attendable()  # (B, 1, T, S)
    if not padded:
        return allowed
    allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return allowed | (key_pos[None, :] == query_pos[:, None])


def attention_layout(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    position_ids: torch.Tensor | None = None,
    sequences: PackedSequences | None = None,
) -> AttentionMask:
    """What the attention layers take for these tokens (arguments as in `build_attention_mask`).

    Rows that pack several sequences (no past) get a `SegmentLayout` where it
    pays off (policy/segment_attention.py): attention runs one sequence at a
    time and costs sum(length x (prefix + length)), not T^2 per row. Everything
    else gets `build_attention_mask`'s mask (or None).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    sequences = _packed_sequences(attention_mask, past_length, query_length, position_ids, sequences, padded)
    if sequences is None:
        return build_attention_mask(attention_mask, past_length, query_length)
    layout = SegmentLayout.from_sequences(
        sequences, None if attention_mask is None else attention_mask[:, -query_length:]
    )
    if layout.pays_off():
        return layout
    return build_attention_mask(attention_mask, past_length, query_length, position_ids, sequences)


def _packed_sequences(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    position_ids: torch.Tensor | None,
    sequences: PackedSequences | None,
    padded: bool,
) -> PackedSequences | None:
    """The rows' packed sequences; None when there is a past, no positions, or one unpadded sample per row."""
    key_length = past_length + query_length
    if attention_mask is not None and attention_mask.shape[-1] != key_length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns; expected past ({past_length}) "
            f"+ new ({query_length}) = {key_length} tokens"
        )
    if sequences is None and position_ids is not None and past_length == 0:
        real = None if attention_mask is None else attention_mask[:, -query_length:]
        sequences = PackedSequences.from_positions(position_ids, real)
    if sequences is not None and not padded and not bool(sequences.segment[:, -1].any()):
        return None  # one sample per row: plain causal order (one host sync, as in transformers)
    return sequences


class MultiheadLatentAttention(nn.Module):
    """MLA for one layer; `layer_idx` selects its slot in the latent cache; `absorb_decode`: decode
    with the absorbed path (default) or the expanded one."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.absorb_decode = True
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.rope_interleave = bool(config.rope_interleave)
        self.scale = softmax_scale(config)
        self.attention_dropout = float(config.attention_dropout or 0.0)
        hidden, qk_dim, bias = config.hidden_size, self.nope_dim + self.rope_dim, config.attention_bias

        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden), rope cos/sin (B, T, d_r/2), mask of `attention_layout` -> (B, T, hidden)."""
        cos, sin = rope
        q_nope, q_rope = self._queries(x, cos, sin)  # (B, T, n, d_n), (B, T, n, d_r)
        entries = self._latent_entries(x, cos, sin)  # (B, T, c + d_r)
        if cache is None:
            kv, absorbed = entries, False
        else:
            absorbed = self.absorb_decode and cache.get_seq_length(self.layer_idx) > 0
            kv = cache.update(self.layer_idx, entries)  # (B, S, c + d_r)
        attend = self._absorbed if absorbed else self._expanded
        return self.o_proj(attend(q_nope, q_rope, kv, mask))

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        low_rank = self.q_lora_rank is not None
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if low_rank else self.q_proj(x)
        q = q.view(*x.shape[:2], self.num_heads, self.nope_dim + self.rope_dim)  # (B, T, n, d_n + d_r)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, self.rope_interleave)

    def _latent_entries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the cache stores per token: [RMSNorm(c_KV); RoPE(k_R)] (B, T, c + d_r)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)  # (B, T, d_r)
        return torch.cat((self.kv_a_layernorm(latent), k_rope), dim=-1)

    def _expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Attention over keys/values expanded from the latents -> (B, T, n * d_v)."""
        batch, seq_q, seq_k = q_nope.shape[0], q_nope.shape[1], kv.shape[1]
        latent, k_rope = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        k_nope, v = (
            self.kv_b_proj(latent)
            .view(batch, seq_k, self.num_heads, self.nope_dim + self.v_dim)
            .split([self.nope_dim, self.v_dim], dim=-1)
        )  # (B, S, n, d_n), (B, S, n, d_v)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, n, d_n + d_r)
        # zero-padding v to the q/k width lets SDPA take its fused (flash) kernel; the pad columns are dropped
        v = F.pad(v, (0, max(0, q.shape[-1] - self.v_dim)))
        dropout_p = self.attention_dropout if self.training else 0.0
        if isinstance(mask, SegmentLayout):  # packed rows, one sequence at a time
            out = mask.attend(q, k, v, self.scale, dropout_p)[..., : self.v_dim]  # (B, T, n, d_v)
            return out.reshape(batch, seq_q, self.num_heads * self.v_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=mask is None and seq_q > 1,
            scale=self.scale,
        )  # (B, n, T, max(d_v, d_n + d_r))
        return out[..., : self.v_dim].transpose(1, 2).reshape(batch, seq_q, self.num_heads * self.v_dim)

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention in latent space, reading only the cache (B, S, c + d_r) -> (B, T, n * d_v)."""
        batch, seq_q = q_nope.shape[:2]
        if mask is None and seq_q > 1:
            mask = build_attention_mask(None, kv.shape[1] - seq_q, seq_q)
        kv, w_ukv = self._absorbed_operands(kv)
        w_ukv = w_ukv.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_ukv.split([self.nope_dim, self.v_dim], dim=1)  # (n, d_n, c), (n, d_v, c)
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # (B, n, T, c + d_r)
        # heads folded into the query rows: one bmm against the single latent "head", no broadcast copies
        scores = torch.bmm(q.flatten(1, 2), kv.transpose(1, 2)) * self.scale  # (B, n * T, S)
        scores = scores.view(batch, self.num_heads, seq_q, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out_latent = torch.bmm(probs.flatten(1, 2), kv[..., : self.kv_rank])  # (B, n * T, c)
        out_latent = out_latent.view(batch, self.num_heads, seq_q, self.kv_rank)
        out = torch.einsum("bhtc,hvc->bthv", out_latent, w_uv)  # (B, T, n, d_v)
        return out.reshape(batch, seq_q, self.num_heads * self.v_dim)

    def _absorbed_operands(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache (B, S, c + d_r) and W_UKV (n * (d_n + d_v), c) as kv_b_proj's GEMM sees them."""
        if not isinstance(self.kv_b_proj, FP8Linear):
            return kv, self.kv_b_proj.weight
        latent = self.kv_b_proj.rounded_input(kv[..., : self.kv_rank])
        kv = torch.cat((latent, kv[..., self.kv_rank :]), dim=-1)
        return kv, self.kv_b_proj.rounded_weight()
