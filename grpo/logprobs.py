"""Token log-probabilities without materialising full-vocabulary logits.

A GRPO batch of N completions of T tokens over a vocabulary of V words would
need N * T * V fp32 logits (and as much again for their gradient) if computed
at once: 64 x 1024 x 129280 x 4 bytes = 34 GB for DeepSeek-V3. Instead the
decoder's last hidden states are pushed through the output head a chunk of
tokens at a time; each chunk's logits are reduced to the log-probability of the
sampled token (and its entropy) and then freed. With gradients enabled every
chunk is checkpointed, so the backward pass recomputes its logits instead of
keeping them: peak memory is one chunk of logits, whatever N and T.

`TokenLogprobModel` wraps any causal LM (ours or a Hugging Face one, with or
without a peft adapter) so that a forward call returns completion-token
log-probs; accelerate/DDP/FSDP wrap this module, so every forward goes through
their hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from r1kit.grpo.packing import plan_packing, row_capacity, same_prompt_groups
from r1kit.policy.attention import build_attention_mask
from r1kit.policy.modeling import DeepseekV3Model
from r1kit.rollout.token_sets import TokenSets


def _chunk_logprobs(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    temperature: float,
    softcap: float | None,
    kept: TokenSets | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy for hidden (n, H), targets (n,): each (n,) float32.

    kept: the n positions' kept sets; logits outside them are -inf before normalisation.
    """
    logits = head(hidden).float()  # (n, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    mask = None if kept is None else kept.to_mask(logits.shape[-1], logits.device)  # (n, V)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        finite_logits = logits if mask is None else logits.masked_fill(~mask, 0.0)  # 0 * -inf would be nan
        entropy = log_norm - (probs * finite_logits).sum(dim=-1)
    return logp, entropy


def token_logprobs_from_hidden(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    softcap: float | None = None,
    kept: TokenSets | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of `targets` under `head(hidden) / temperature`.

    hidden: (N, T, H) decoder states whose next token is `targets` (N, T).
    head: the output projection (H -> V).
    kept: the sampler's kept set of each of the N * T positions, row-major
        (`TokenSets.grid`); the distribution at a position is then renormalised
        over its kept set (logits outside it are -inf after softcap and
        temperature), as the sampler's was. Unrestricted positions are unchanged;
        a target outside its kept set gets -inf.
    Returns (logp, entropy), each (N, T) float32; entropy carries no gradient.
    """
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    n, t, h = hidden.shape
    if kept is not None and len(kept) != n * t:
        raise ValueError(f"kept has {len(kept)} rows, expected N * T = {n * t}")
    flat_hidden, flat_targets = hidden.reshape(n * t, h), targets.reshape(n * t)
    logps, entropies = [], []
    for start in range(0, n * t, chunk_size):
        chunk_kept = None if kept is None else kept.slice(start, min(start + chunk_size, n * t))
        args = (
            flat_hidden[start : start + chunk_size],
            flat_targets[start : start + chunk_size],
            head,
            temperature,
            softcap,
            None if chunk_kept is None or chunk_kept.ids.numel() == 0 else chunk_kept,  # all unrestricted: no mask
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps).view(n, t), torch.cat(entropies).view(n, t)


@dataclass
class TokenLogprobs:
    """What a policy forward returns for a batch of N completions of T tokens.

    logp: (N, T) float32 log-probs of the completion tokens (with gradient).
    entropy: (N, T) float32 entropy of the next-token distribution, no gradient.
    aux_loss: MoE balance loss of this forward (0-dim), or None for dense models.
    mtp_loss: multi-token-prediction loss on the completion tokens, or None.
    padded_token_slots: token slots of the padded layout, N * (P + T).
    token_slots: token slots the decoder ran over: padded_token_slots, or rows x capacity when packed.
    """

    logp: Tensor
    entropy: Tensor
    aux_loss: Tensor | None = None
    mtp_loss: Tensor | None = None
    padded_token_slots: int = 0
    token_slots: int = 0


def packed_rows_attention(model: nn.Module) -> str | None:
    """How `model` (ours or a transformers causal LM, with or without a peft adapter) takes packed rows.

    "mask": our DeepSeek-V3, which builds the block-diagonal causal mask from
    restarting position_ids and also takes the padding mask (padding then stays
    out of the MoE balance loss and the router loads). "positions": a
    transformers model whose masks come from `masking_utils` with sdpa or eager
    attention over full or sliding-window attention layers, which finds packed
    samples in position_ids when attention_mask is None. None: anything else
    (flash-attention kernels pack only a single row, flex attention, recurrent
    or linear-attention layers, chunked attention, non-causal models): padded
    batches only.
    """
    decoder = model.get_decoder()
    if isinstance(decoder, DeepseekV3Model):
        return "mask"
    config = decoder.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if (
        getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and getattr(decoder, "_supports_attention_backend", False)
        and getattr(config, "is_causal", True)
        and layer_types <= {"full_attention", "sliding_attention"}
    ):
        return "positions"
    return None


def takes_shared_prefix_mask(model: nn.Module) -> bool:
    """Whether a transformers model taking packed rows by position ids ("positions") also takes the mask of
    completions sharing a prompt: a custom (B, 1, T, T) mask, which transformers passes to sdpa and eager
    attention as it is. Only with full attention in every layer: a custom mask would drop a sliding window."""
    if packed_rows_attention(model) != "positions":
        return False
    config = model.get_decoder().config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types) == {"full_attention"}
    return getattr(config, "sliding_window", None) is None


def shared_prefix_mask(model: nn.Module, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """The (R, 1, C, C) mask of packed rows whose sequences may continue a shared prefix, as `model`'s
    attention takes it: boolean for sdpa (True: attend), additive for eager (0 or the dtype's minimum).

    attention_mask (R, C): 1 on real tokens; position_ids (R, C), restarting per sequence (`PackedSequences`).
    """
    allowed = build_attention_mask(attention_mask, 0, attention_mask.shape[1], position_ids)  # (R, 1, C, C)
    if model.get_decoder().config._attn_implementation == "sdpa":
        return allowed
    dtype = model.get_output_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class TokenLogprobModel(nn.Module):
    """A causal LM whose forward returns the log-probs of the completion tokens.

    Sequences come laid out as `[left-padded prompt (P) | right-padded completion (T)]`;
    the hidden state at position p predicts the token at p + 1, so positions
    P - 1 .. P + T - 2 score the completion.

    padding_free: run the decoder over the sequences packed into rows without
    padding instead (grpo/packing.py): whole sequences back to back, positions
    restarting at 0 for every sequence, rows of `capacity(lengths)` tokens for the
    batch's sequence lengths (default `packing.row_capacity`). Results come back in
    the padded (N, T) layout, zeros on padding; the output head runs on real
    completion tokens only. Models that cannot take packed rows
    (`packed_rows_attention`) run padded.

    share_prompts (with padding_free, not with the MTP loss): sequences with the
    same prompt (a GRPO group in one micro-batch) hold it once per unit, their
    completions after it (`packing.plan_packing`'s prompt_groups), so the prompt
    is computed once instead of once per completion. Our DeepSeek-V3 reads the
    shared prompts from the position ids; transformers models with sdpa or eager
    full attention in every layer get the rows' mask built here
    (`shared_prefix_mask`); others pack whole sequences. Log-probs, gradients and
    the MoE balance loss and loads are those of the padded batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        padding_free: bool = False,
        capacity: Callable[[list[int]], int] = row_capacity,
        share_prompts: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.packing = packed_rows_attention(model) if padding_free else None
        self.capacity = capacity
        self.share_prompts = share_prompts and (
            self.packing == "mask" or (self.packing == "positions" and takes_shared_prefix_mask(model))
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        prompt_length: int,
        completion_mask: Tensor | None = None,
        with_mtp: bool = False,
        routed_experts: Tensor | None = None,
        kept_tokens: TokenSets | None = None,
    ) -> TokenLogprobs:
        """input_ids, attention_mask, position_ids: (N, P + T); completion_mask (N, T) for the MTP loss.

        routed_experts (num_moe_layers, N, P + T, K): the sampler's experts to replay (keep
        routing; DeepSeek-V3 policies). kept_tokens: the sampler's kept set of each of the
        N * T completion positions; log-probs are then under the same truncated, renormalised
        distribution (keep sampling mask).
        """
        if with_mtp and completion_mask is None:
            raise ValueError("the MTP loss needs completion_mask")
        loss_mask = None
        if with_mtp:  # (N, P + T): the completion tokens that are targets
            loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            loss_mask[:, prompt_length:] = completion_mask.bool()
        if self.packing is not None:
            return self._packed(input_ids, attention_mask, prompt_length, loss_mask, routed_experts, kept_tokens)
        replay = {} if routed_experts is None else {"routed_experts": routed_experts}
        decoder_output = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **replay
        )
        hidden = decoder_output.last_hidden_state  # (N, P + T, H)
        logp, entropy = self._logprobs(hidden[:, prompt_length - 1 : -1], input_ids[:, prompt_length:], kept_tokens)
        mtp_loss = None
        if loss_mask is not None:
            mtp_loss = self.model.mtp_loss(hidden, input_ids, loss_mask, attention_mask, position_ids)
        aux_loss = getattr(decoder_output, "aux_loss", None)
        return TokenLogprobs(logp, entropy, aux_loss, mtp_loss, input_ids.numel(), input_ids.numel())

    def _packed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        loss_mask: Tensor | None,
        routed_experts: Tensor | None,
        kept_tokens: TokenSets | None,
    ) -> TokenLogprobs:
        """The forward over the sequences packed into rows (see the class docstring); same arguments."""
        real = attention_mask.bool()
        prompts = real[:, :prompt_length].sum(dim=1).tolist()
        completions = real[:, prompt_length:].sum(dim=1).tolist()
        groups = None
        if self.share_prompts and loss_mask is None:
            routes = None if routed_experts is None else routed_experts[:, :, :prompt_length].movedim(0, 2)
            groups = same_prompt_groups(input_ids[:, :prompt_length], real[:, :prompt_length], routes)
        plan = plan_packing(
            prompts,
            completions,
            prompt_length,
            input_ids.shape[1] - prompt_length,
            device=input_ids.device,
            prompt_groups=groups,
            capacity=self.capacity,
        )
        packed_ids = plan.pack(input_ids, 0)  # (R, C)
        packed_mask = plan.attention_mask if self.packing == "mask" else None
        if self.packing == "positions" and groups is not None:  # a transformers model sharing prompts
            packed_mask = shared_prefix_mask(self.model, plan.attention_mask, plan.position_ids)
        replay = {}
        if routed_experts is not None:  # (L, N, P + T, K) -> (L, R, C, K), -1 (route live) on padding
            replay["routed_experts"] = plan.pack(routed_experts.movedim(0, 2), -1).movedim(2, 0)
        decoder_output = self.model.get_decoder()(
            input_ids=packed_ids, attention_mask=packed_mask, position_ids=plan.position_ids, use_cache=False, **replay
        )
        hidden = decoder_output.last_hidden_state  # (R, C, H)
        scoring = hidden.flatten(0, 1).index_select(0, plan.score_index)  # (S, H): states before completion tokens
        targets = input_ids[:, prompt_length:].reshape(-1)[plan.completion_index]  # (S,)
        kept = None if kept_tokens is None else kept_tokens.select(plan.completion_index)
        logp, entropy = self._logprobs(scoring.unsqueeze(0), targets.unsqueeze(0), kept)  # (1, S) each
        mtp_loss = None
        if loss_mask is not None:
            packed_loss_mask = plan.pack(loss_mask, False)
            mtp_loss = self.model.mtp_loss(hidden, packed_ids, packed_loss_mask, packed_mask, plan.position_ids)
        return TokenLogprobs(
            plan.unpack_completions(logp[0]),
            plan.unpack_completions(entropy[0]),
            getattr(decoder_output, "aux_loss", None),
            mtp_loss,
            padded_token_slots=input_ids.numel(),
            token_slots=packed_ids.numel(),
        )

    def _logprobs(self, hidden: Tensor, targets: Tensor, kept: TokenSets | None) -> tuple[Tensor, Tensor]:
        """`token_logprobs_from_hidden` with this model's output head, temperature, chunk size and softcap."""
        return token_logprobs_from_hidden(
            hidden,
            targets,
            self.model.get_output_embeddings(),
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            softcap=self.softcap,
            kept=kept,
        )
