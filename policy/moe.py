"""DeepSeekMoE: shared experts plus fine-grained routed experts, sigmoid routing, balancing, grouped dispatch.

Routing (DeepSeek-V3, eqs. 12-16), for a token u and routed expert i of N_r:

    s_i    = sigmoid(u . e_i)                                  affinity, fp32
    group score = sum of the top-2 (s_j + b_j) in each of n_group groups;
    keep the topk_group best groups (node-limited routing), then
    TopK   = the K experts with the largest s_i + b_i among the kept groups
    g_i    = s_i / sum_{j in TopK} s_j * routed_scaling_factor  (norm_topk_prob)
    out    = sum_shared FFN_s(u) + sum_{i in TopK} g_i FFN_i(u)

The bias b (`e_score_correction_bias`) steers selection only, never the gate
values g. It is an fp32 buffer without gradient, kept fp32 when the model is
cast, and updated once per optimizer step from that step's token counts:

    b_i <- b_i + gamma * sign(mean_j(load_j) - load_i)       (routing_bias_update)

Complementary sequence-wise balance loss (eqs. 17-20), per sequence of T tokens:

    f_i = N_r / (K T) * sum_t 1[i in TopK_t]
    P_i = 1/T * sum_t s_i,t / sum_j s_j,t
    L   = alpha * sum_i f_i P_i,   averaged over the sequences of the batch.

Departures: TopK_t in f_i is the selection actually made (with bias and group
limit), as in Megatron and torchtitan; padding tokens count neither in T, f, P
nor in the bias-update loads. A "sequence" is a sample: several samples packed
into one row (position ids restarting, `PackedSequences`) are balanced each on
its own, so a packed batch has the loss of the same samples padded, one a row;
samples sharing a prefix (one prompt, several completions) each count the
prefix's tokens, in the balance loss and in the loads, as if padded too.

Dispatch: the N*K (token, expert) pairs are sorted by expert and every
routed GEMM goes through `RoutedExperts.expert_linear` over the sorted rows
(one call for gate+up, one for down). The gate value scales the
down-projection input (g W_down h = W_down (g h), the narrower tensor); the
outputs are un-permuted to (token, k) order with a gather and summed over k
(deterministic, no atomic scatter). No Python loop over experts.
`grouped_linear` runs `torch.nn.functional.grouped_mm` wherever torch 2.13 has
a kernel (CUDA bf16 on sm80+; CPU fp32/bf16/fp16 with 16-byte-aligned rows)
and otherwise one `bmm` over rows padded to the busiest expert's count; on CPU
grouped_mm is the faster of the two, by far on skewed loads (docs/policy.md).
Expert weights are 3-D parameters (E, out, in): `gate_up_proj` (E, 2I, H),
gate rows first, and `down_proj` (E, H, I), exactly transformers' fused layout.
Under FP8 training (`RoutedExperts.fp8` set, see policy/fp8_policy.py) the same
two calls run `fp8_grouped_linear`: all three GEMMs in block-scaled E4M3, each
expert's weights in their own 128 x 128 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from r1kit.policy.attention import PackedSequences
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_grouped import fp8_grouped_linear
from r1kit.policy.layers import MLP


def group_limited_topk(scores_for_choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Expert indices (N, top_k) of the best `top_k` experts inside the best `topk_group` of `n_group` groups.

    scores_for_choice (N, E): affinities plus routing bias. A group's score is
    the sum of its two best experts' scores.
    """
    num_tokens, num_experts = scores_for_choice.shape
    if n_group > 1:
        grouped = scores_for_choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
        kept_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)  # (N, E)
        scores_for_choice = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
    return scores_for_choice.topk(top_k, dim=-1, sorted=False).indices


def sequence_balance_loss(
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    sequences: PackedSequences | None = None,
) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over sequences (without alpha); a scalar.

    scores (B, T, E) sigmoid affinities; topk_idx (B, T, K) chosen experts;
    token_mask (B, T) bool, False for padding; sequences: the samples packed in
    each row (`policy.attention.PackedSequences`), None for one sequence per row.
    A sample continuing a shared prefix counts the prefix's tokens as its own.
    Sequences without a real token of their own are left out. Gradient flows
    through P only.
    """
    batch, seq, num_experts = scores.shape
    top_k = topk_idx.shape[-1]
    mask = scores.new_ones(batch, seq) if token_mask is None else token_mask.to(scores.dtype)  # (B, T)
    rows = torch.arange(batch, device=scores.device).unsqueeze(1)  # (B, 1)
    if sequences is None:
        segments = batch
        segment = rows.expand(batch, seq).reshape(-1)  # (B*T,): the row
    else:
        segments = batch * seq  # an upper bound: every (row, sequence) pair gets its own index
        segment = (rows * seq + sequences.segment).reshape(-1)  # (B*T,)
    has_tokens = (mask.new_zeros(segments).index_add_(0, segment, mask.reshape(-1)) > 0).to(scores.dtype)  # (S,)
    chosen = torch.zeros_like(scores).scatter_(-1, topk_idx, 1.0) * mask.unsqueeze(-1)  # (B, T, E)
    normalised = scores / scores.sum(dim=-1, keepdim=True) * mask.unsqueeze(-1)  # (B, T, E)
    if sequences is not None and sequences.shares_prefixes:  # each segment's first token adds its prefix
        mask, chosen = mask + sequences.prefix_sums(mask), chosen + sequences.prefix_sums(chosen)
        normalised = normalised + sequences.prefix_sums(normalised)
    tokens = mask.new_zeros(segments).index_add_(0, segment, mask.reshape(-1))  # (S,)
    counts = scores.new_zeros(segments, num_experts).index_add_(0, segment, chosen.view(-1, num_experts))
    shares = scores.new_zeros(segments, num_experts).index_add(0, segment, normalised.view(-1, num_experts))
    per_token = 1 / tokens.clamp(min=1).unsqueeze(-1)  # (S, 1)
    f = num_experts / top_k * counts * per_token  # (S, E)
    p = shares * per_token  # (S, E)
    return ((f * p).sum(dim=-1) * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def expert_load(
    topk_idx: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    sequences: PackedSequences | None = None,
) -> torch.Tensor:
    """Tokens routed to each expert (E,) from topk_idx (B * T, K): padding (token_mask (B, T) False) left
    out, and a token of a shared prefix counted once per sample holding it (`PackedSequences.memberships`)."""
    weights = None
    if sequences is not None and sequences.shares_prefixes:
        weights = sequences.memberships().reshape(-1, 1).expand_as(topk_idx).to(torch.float32)
    if token_mask is not None:
        real = token_mask.reshape(-1)
        topk_idx, weights = topk_idx[real], None if weights is None else weights[real]
    return torch.bincount(topk_idx.flatten(), None if weights is None else weights.flatten(), minlength=num_experts)


def routing_bias_update(bias: torch.Tensor, load: torch.Tensor, speed: float) -> torch.Tensor:
    """b + speed * sign(mean(load) - load): raises the bias of under-loaded experts, lowers over-loaded."""
    return bias + speed * torch.sign(load.mean(dim=-1, keepdim=True) - load)


class Router(nn.Module):
    """Sigmoid gate with the selection bias and the per-expert token counts of the current step."""

    _FP32_BUFFERS = ("e_score_correction_bias", "expert_load")

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        self.expert_load = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def forward(
        self, x: torch.Tensor, replay: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> affinities (N, E) fp32, chosen experts (N, K), gate values (N, K) fp32.

        replay (N, K): experts to use instead of choosing (keep routing); rows of -1
        are routed as usual. Gate values always come from this router's affinities
        over the experts used, so the router keeps learning under replay.
        """
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            topk_idx = group_limited_topk(
                scores + self.e_score_correction_bias, self.n_group, self.topk_group, self.top_k
            )
            if replay is not None:
                replayed = replay[:, :1] >= 0  # (N, 1)
                topk_idx = torch.where(replayed, replay.to(topk_idx.dtype), topk_idx)
        gates = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, gates * self.scaling

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """Adds one forward's token counts per expert (E,) to the step's total."""
        self.expert_load += counts.to(self.expert_load)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """Applies the sign update from `load` (E,) and resets the accumulated counts."""
        load = load.to(self.e_score_correction_bias)
        self.e_score_correction_bias.copy_(routing_bias_update(self.e_score_correction_bias, load, speed))
        self.expert_load.zero_()

    def _apply(self, fn, recurse=True):
        """Moves the bias and counts with the module (`to`, `cuda`, `to_empty` from the meta device) but
        never changes their fp32 dtype: where `fn` casts, the fp32 original moves instead."""
        fp32 = {name: self._buffers.pop(name) for name in self._FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, buffer in fp32.items():
            moved = fn(buffer)
            self._buffers[name] = moved if moved.dtype == torch.float32 else buffer.to(device=moved.device)
        return self


def has_moe_layers(model: nn.Module) -> bool:
    """Whether the decoder of `model` (ours, possibly under a peft adapter) has DeepSeekMoE layers, whose
    routing can be recorded and replayed (the MTP modules' are not: the sampler never runs them)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return any(isinstance(module, Router) for module in decoder.modules())


@dataclass
class ExpertLayout:
    """Where each (token, expert) pair goes once the N*K pairs are sorted by expert.

    token_index (N*K,): source token of each sorted row; pair_index (N*K,): its
    position in the flattened (N, K) routing, and inverse (N*K,) the sorted row
    of each pair; expert (N*K,) and row (N*K,): its expert and its row inside
    that expert's group; counts (E,) rows per expert.
    """

    token_index: torch.Tensor
    pair_index: torch.Tensor
    inverse: torch.Tensor
    expert: torch.Tensor
    row: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_topk(cls, topk_idx: torch.Tensor, num_experts: int) -> ExpertLayout:
        flat = topk_idx.flatten()  # (N*K,)
        pair_index = flat.argsort(stable=True)
        expert = flat[pair_index]
        counts = torch.bincount(flat, minlength=num_experts)  # (E,)
        positions = torch.arange(flat.numel(), device=flat.device)  # (N*K,)
        row = positions - (counts.cumsum(0) - counts)[expert]
        inverse = torch.empty_like(pair_index).scatter_(0, pair_index, positions)
        return cls(pair_index // topk_idx.shape[1], pair_index, inverse, expert, row, counts)

    @cached_property
    def capacity(self) -> int:
        """Rows of the busiest expert (a host sync; only the padded fallback needs it)."""
        return int(self.counts.max()) if self.counts.numel() else 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Row r of x (N*K, in), sorted by expert, times weight[expert_r].T (E, out, in) -> (N*K, out)."""
    if _grouped_mm_applies(x, weight):
        return grouped_mm_linear(x, weight, layout)
    return padded_bmm_linear(x, weight, layout)


def grouped_mm_linear(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """torch's grouped GEMM over the expert-sorted rows (no padding)."""
    offsets = layout.counts.cumsum(0).to(torch.int32)  # end row of each expert
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def padded_bmm_linear(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Rows scattered into (E, capacity, in) zeros, one bmm, rows gathered back; works everywhere."""
    padded = x.new_zeros(weight.shape[0], layout.capacity, x.shape[-1])  # (E, C, in)
    padded = padded.index_put((layout.expert, layout.row), x)
    return torch.bmm(padded, weight.transpose(1, 2))[layout.expert, layout.row]  # (N*K, out)


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where torch 2.13's grouped_mm runs: CUDA bf16 on sm80+, CPU fp32/bf16/fp16; 16-byte-aligned rows."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype or not x.is_contiguous():
        return False
    if x.is_cuda:
        dtype_ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        dtype_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
    return dtype_ok and aligned and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights; all their GEMMs go through `expert_linear`.

    `fp8`: the FP8 recipe their GEMMs run under, None for the parameters' own precision.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        experts, hidden, inner = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        self.act_fn = ACT2FN[config.hidden_act]
        self.fp8: FP8Config | None = None

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
        """The one routed-expert GEMM: sorted rows x (N*K, in) times their expert's weight (E, out, in)."""
        if self.fp8 is not None:
            return fp8_grouped_linear(x, weight, layout.counts, self.fp8)
        return grouped_linear(x, weight, layout)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fp8={self.fp8}"

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), topk_idx (N, K), gates (N, K) -> sum_k gates[:, k] * FFN_{topk_idx[:, k]}(x)."""
        layout = ExpertLayout.from_topk(topk_idx, self.num_experts)
        # index_select, not indexing: its backward is an index_add, several times faster than indexing's
        # accumulating index_put on CPU
        rows = x.index_select(0, layout.token_index)  # (N*K, hidden)
        scale = gates.flatten().index_select(0, layout.pair_index).to(x.dtype).unsqueeze(-1)  # (N*K, 1)
        out = self.expert_ffn(rows, scale, layout, self.gate_up_proj, self.down_proj)  # (N*K, hidden)
        out = out.index_select(0, layout.inverse)
        return out.view(*topk_idx.shape, -1).sum(dim=1)  # (N, K, hidden) -> (N, hidden)

    def expert_ffn(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        layout: ExpertLayout,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
    ) -> torch.Tensor:
        """scale * FFN_e(row) for rows (M, hidden) sorted by expert as `layout` says, scale (M, 1) their gate
        values, with the experts' weights gate_up_proj (E, 2I, hidden) and down_proj (E, hidden, I) -> (M, hidden).

        The seam expert parallelism overrides (policy/parallelize.py): it runs this on the rows it receives.
        """
        gate, up = self.expert_linear(rows, gate_up_proj, layout).chunk(2, dim=-1)
        # the gate value scales the (narrower) down-projection input: g * W_down(h) = W_down(g * h)
        return self.expert_linear(self.act_fn(gate) * up * scale, down_proj, layout)


@dataclass
class MoEOutput:
    """hidden (B, T, H); aux_loss: alpha-weighted balance loss (None outside training or when alpha is 0);
    load (E,): tokens per expert in this forward (None outside training); experts (B, T, K): the
    routed experts of every token."""

    hidden: torch.Tensor
    aux_loss: torch.Tensor | None
    load: torch.Tensor | None
    experts: torch.Tensor


class MoE(nn.Module):
    """Shared experts plus routed experts behind the sigmoid router."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.alpha = config.seq_balance_alpha
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act)
            if config.n_shared_experts > 0
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        replay: torch.Tensor | None = None,
        sequences: PackedSequences | None = None,
    ) -> MoEOutput:
        """x (B, T, H); token_mask (B, T) bool, False for padding (excluded from balance statistics);
        replay (B, T, K): experts to route each token to, -1 where the router chooses (see `Router`);
        sequences: the samples packed in each row, balanced one by one (None: one per row).
        Balance loss and load count the experts actually used, replayed or chosen; a token of a
        shared prefix counts in the load once per sample holding it."""
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        flat_replay = None if replay is None else replay.reshape(batch * seq, -1)
        scores, topk_idx, gates = self.gate(flat, flat_replay)  # (N, E), (N, K), (N, K)
        out = self.experts(flat, topk_idx, gates).view(batch, seq, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        experts = topk_idx.view(batch, seq, -1)
        if not self.training:
            return MoEOutput(out, None, None, experts)
        aux_loss = None
        if self.alpha > 0:
            aux_loss = self.alpha * sequence_balance_loss(
                scores.view(batch, seq, -1), topk_idx.view(batch, seq, -1), token_mask, sequences
            )
        load = expert_load(topk_idx, self.gate.num_experts, token_mask, sequences)
        return MoEOutput(out, aux_loss, load, experts)
