"""The built-in rollout engine: batched sampling with a KV cache, in plain torch.

Works with any causal LM that follows the Hugging Face cache interface (our
DeepSeek-V3 policy with its latent cache, or any transformers model). What it
does that `model.generate` does not, and why GRPO rollouts need it:

- each prompt is prefilled once and its cache rows are repeated for its `n`
  samples (generate prefills every sample: n times the prompt compute);
- the cache is sized up front for prompt + max_new_tokens (rollout/kv_cache.py),
  so a decode step writes one token in place instead of re-concatenating the
  whole cache as transformers' DynamicCache does;
- rows that emit a stop token (or complete a stop string) are dropped from the batch and the cache once a
  quarter of the rows are finished, so long stragglers do not pay for finished
  rows (generate keeps decoding finished rows until the last one stops).

Prompts are left-padded so that every row's next token sits in the last
column; each decode step feeds one token per row.

The engine owns the module it is given. Hand it a copy of the trainer's policy
to keep generation and training apart, or the trainer's module itself to share
memory (then `update_weights` sees the same tensors and copies nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from r1kit.policy.moe import has_moe_layers
from r1kit.policy.transformers_compat import CACHE_NAME
from r1kit.rollout.engine import DraftCounts, FinishReason, RolloutBatch, SamplingParams
from r1kit.rollout.kv_cache import make_decode_cache
from r1kit.rollout.speculative import MTPDrafter, VerifiedTokens, verify_drafts
from r1kit.rollout.stop_strings import StopStrings
from r1kit.rollout.token_sets import TokenSets


class TorchRolloutEngine:
    """RolloutEngine over an in-process torch model.

    model: a causal LM accepting (input_ids, attention_mask, position_ids,
        use_cache, logits_to_keep) and its decoding cache under the name the
        installed transformers uses (`cache`, or `past_key_values` before 5.24).
    tokenizer: decodes completions; its pad token id pads prompts.
    max_batch_rows: at most this many sequences are decoded together (a prompt's n
        samples always share a batch, so a batch holds max(1, max_batch_rows // n) prompts).
    num_speculative_tokens: k > 0 drafts k tokens per round with the policy's first MTP
        module and verifies them in one forward (rollout/speculative.py): the same
        distribution, fewer forwards. Needs a DeepSeek-V3 policy with MTP modules.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, max_batch_rows: int = 256, num_speculative_tokens: int = 0
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        if num_speculative_tokens > 0 and len(getattr(model, "mtp", ())) == 0:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens} drafts with the policy's MTP modules; "
                f"{type(model).__name__} has none (DeepSeek-V3 policies with num_nextn_predict_layers >= 1 do)"
            )
        self.model = model
        self.num_speculative_tokens = num_speculative_tokens
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.policy_version = 0
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one batch or one weight update at a time
        self._executor: ThreadPoolExecutor | None = None

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Future[RolloutBatch]:
        """`generate` on a background thread (torch kernels release the GIL while they run)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        return self._executor.submit(self.generate, prompts, params)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions per prompt; rows are grouped by prompt."""
        with self._lock:
            return self._generate(prompts, params)

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        prompts_per_batch = max(1, self.max_batch_rows // params.n)  # a group is never split
        if params.record_routing and not has_moe_layers(self.model):
            raise ValueError(
                f"record_routing (keep routing) needs a policy with DeepSeekMoE layers; "
                f"{type(self.model).__name__} has none"
            )
        pieces: list[_Groups] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(prompts), prompts_per_batch):
                    chunk = [list(p) for p in prompts[start : start + prompts_per_batch]]
                    pieces.append(self._generate_groups(chunk, params, generator))
        finally:
            self.model.train(was_training)
        completions = [row for piece in pieces for row in piece.completion_ids]
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(params.n)],
            completion_ids=completions,
            completion_text=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            sampler_logprobs=[row for piece in pieces for row in piece.logprobs],
            finish_reason=[row for piece in pieces for row in piece.finish_reason],
            policy_version=self.policy_version,
            routed_experts=[row for piece in pieces for row in piece.routed_experts] if params.record_routing else None,
            kept_tokens=[row for piece in pieces for row in piece.kept_tokens] if params.record_kept_tokens else None,
            draft_counts=[row for piece in pieces for row in piece.drafts] if self.num_speculative_tokens else None,
        )

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache, *, last_only: bool,
        record_routing: bool, with_hidden: bool,
    ) -> _Step:  # fmt: skip
        """One forward with the decode cache: logits (R, 1 or m, V), and the hidden states and routing when asked."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True,
                  CACHE_NAME: cache, **({"output_routed_experts": True} if record_routing else {})}  # fmt: skip
        if not with_hidden:
            out = self.model(input_ids=input_ids, logits_to_keep=1 if last_only else 0, **kwargs)
            return _Step(out.logits, getattr(out, CACHE_NAME), None, getattr(out, "routed_experts", None))
        out = self.model.get_decoder()(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, -1:] if last_only else hidden)
        return _Step(logits, getattr(out, CACHE_NAME), hidden, out.routed_experts)

    def _prefill(
        self, prompts: list[list[int]], n: int, capacity: int, record_routing: bool, drafter: MTPDrafter | None
    ) -> _Prefilled:
        """Runs each prompt once and repeats its cache rows n times (the drafter's too, after it read the prompts)."""
        num_prompts, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((num_prompts, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_prompts, capacity), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) : width] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (attention_mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        step = self._forward(
            input_ids, attention_mask[:, :width], positions, make_decode_cache(self.model, capacity),
            last_only=drafter is None, record_routing=record_routing, with_hidden=drafter is not None,
        )  # fmt: skip
        rows = torch.arange(num_prompts, device=self.device).repeat_interleave(n)  # row i*n+j -> prompt i
        last_hidden = None
        if drafter is not None:
            if width > 1:  # the MTP module reads (h_i, token i + 1) for every prompt position but the last
                real = attention_mask[:, : width - 1].bool()
                drafter.read(step.hidden[:, :-1], input_ids[:, 1:], real, positions[:, :-1])
                drafter.select(rows)
            last_hidden = step.hidden[rows, -1]
        if n > 1:
            step.cache.reorder_cache(rows)
        return _Prefilled(step.logits[rows, -1], step.cache, attention_mask[rows], positions[rows, -1] + 1,
                          step.routing, last_hidden)  # fmt: skip

    def _generate_groups(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None
    ) -> _Groups:
        """Decodes `params.n` samples of each prompt (rows grouped by prompt).

        Every round reads the last sampled token of each row, and with speculation the k
        drafts after it (rollout/speculative.py), and emits 1 to k + 1 tokens per row.
        """
        width, max_new, k = max(len(p) for p in prompts), params.max_new_tokens, self.num_speculative_tokens
        drafter = MTPDrafter(self.model, width + 2 * k * max_new) if k > 0 else None
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "min_p": params.min_p, "generator": generator}  # fmt: skip
        prefilled = self._prefill(prompts, params.n, width + (k + 1) * max_new, params.record_routing, drafter)
        cache, attention_mask, next_position = prefilled.cache, prefilled.attention_mask, prefilled.next_position
        num_rows = len(next_position)
        out = _Completions(num_rows, max_new, params, self.tokenizer, prefilled.prompt_routing, self.device)
        active = torch.arange(num_rows, device=self.device)  # original row of each batch row
        no_drafts = torch.empty((num_rows, 0), dtype=torch.long, device=self.device)
        first = verify_drafts(
            prefilled.logits.unsqueeze(1), no_drafts, None, return_kept=params.record_kept_tokens, **sampling
        )
        done = out.emit(active, first)
        drafts, draft_probs, pending = no_drafts, None, first.tokens[:, 0]
        if drafter is not None:
            drafts, draft_probs = drafter.draft(prefilled.last_hidden.unsqueeze(1), pending.unsqueeze(1),
                                                torch.ones_like(done).unsqueeze(1), next_position.unsqueeze(1) - 1,
                                                num_tokens=k, **sampling)  # fmt: skip
        columns = width
        while not bool(done.all()):
            if 4 * int(done.sum()) >= len(active):  # drop finished rows from the batch and the caches
                keep = (~done).nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                if drafter is not None:
                    drafter.select(keep)
                    draft_probs = None if draft_probs is None else draft_probs[keep]
                active, pending, drafts, next_position = active[keep], pending[keep], drafts[keep], next_position[keep]
                attention_mask, done = attention_mask[keep], done[keep]
            reads = torch.cat((pending.unsqueeze(1), drafts), dim=1)  # (R, k + 1)
            attention_mask[:, columns : columns + k + 1] = (~done).long().unsqueeze(1)
            positions = next_position.unsqueeze(1) + torch.arange(k + 1, device=self.device)
            step = self._forward(reads, attention_mask[:, : columns + k + 1], positions, cache, last_only=False,
                                 record_routing=params.record_routing, with_hidden=drafter is not None)  # fmt: skip
            cache = step.cache
            verified = verify_drafts(step.logits, drafts, draft_probs, return_kept=params.record_kept_tokens,
                                     **sampling)  # fmt: skip
            emitted = torch.arange(k + 1, device=self.device) < verified.counts.unsqueeze(1)  # (R, k + 1)
            attention_mask[:, columns : columns + k + 1] *= emitted  # rejected drafts' columns are never read again
            columns += k + 1
            out.record_reads(active, step.routing, emitted, ~done)
            done |= out.emit(active, verified, ~done)
            next_position = next_position + verified.counts
            pending = verified.tokens.gather(1, verified.counts.unsqueeze(1) - 1).squeeze(1)
            if drafter is not None and not bool(done.all()):
                drafts, draft_probs = drafter.draft(step.hidden, verified.tokens, emitted, positions, num_tokens=k,
                                                    **sampling)  # fmt: skip
        return out.groups(prompts, params.n)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy new weights (state_dict names of the engine's model) in place and stamp `version`."""
        with self._lock:
            self._copy_weights(named_tensors)
            self.policy_version = version

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy some weights in place without changing `policy_version`.

        For updates that arrive in pieces (a worker receiving buckets): the
        caller stamps the version once the last piece is in.
        """
        with self._lock:
            self._copy_weights(named_tensors)

    def _copy_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        targets = dict(self.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in targets:
                    raise KeyError(f"update_weights: the rollout model has no tensor named {name!r}")
                target = targets[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                        f"the rollout model expects {tuple(target.shape)}"
                    )
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)

    def close(self) -> None:
        """Stop the background thread; the model lives as long as its owner keeps it."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


@dataclass
class _Prefilled:
    """After the prefill, per batch row (P * n): logits (R, V) of the first token, the decode cache, the
    attention_mask buffer (R, capacity) with the prompt columns filled, the next position (R,), the
    prompts' routed experts (num_moe_layers, P, width, K) when recorded, and with a drafter the last
    prompt position's hidden state (R, H)."""

    logits: Tensor
    cache: object
    attention_mask: Tensor
    next_position: Tensor
    prompt_routing: Tensor | None
    last_hidden: Tensor | None


@dataclass
class _Step:
    """One forward's logits (R, m, V), cache, hidden states (R, m, H) (with a drafter) and routing
    (num_moe_layers, R, m, K) (when recorded)."""

    logits: Tensor
    cache: object
    hidden: Tensor | None
    routing: Tensor | None


@dataclass
class _Groups:
    """What `_generate_groups` returns: one entry per row, rows grouped by prompt."""

    completion_ids: list[list[int]]
    logprobs: list[Tensor]
    finish_reason: list[FinishReason]
    routed_experts: list[Tensor] = field(default_factory=list)
    kept_tokens: list[TokenSets] = field(default_factory=list)
    drafts: list[DraftCounts] = field(default_factory=list)


class _Completions:
    """The completions of a decode batch as they grow: per original row its tokens, log-probs, length,
    how it ended, and what is recorded (routing, kept sets, draft counts).

    prompt_routing: the prefill's routed experts (num_moe_layers, P, width, K), or None when
    routing is not recorded.
    """

    def __init__(
        self, num_rows: int, max_new: int, params: SamplingParams, tokenizer, prompt_routing: Tensor | None,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.max_new, self.device = max_new, device
        self.tokens = torch.full((num_rows, max_new), -1, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((num_rows, max_new), device=device)
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        self.stop_strings = StopStrings(tokenizer, params.stop_strings) if params.stop_strings else None
        self.prompt_routing, self.decode_routing = prompt_routing, None
        if prompt_routing is not None:  # (num_moe_layers, rows, max_new, K): experts used reading each token
            layers, _, _, top_k = prompt_routing.shape
            self.decode_routing = prompt_routing.new_full((layers, num_rows, max_new, top_k), -1)
        self.kept: list[tuple[Tensor, TokenSets]] = []  # (row * max_new + token index, kept sets) per emission
        self.draft_counts = torch.zeros((num_rows, 3), dtype=torch.long, device=device)  # rounds, drafted, accepted

    def record_reads(self, active: Tensor, routing: Tensor | None, read: Tensor, live: Tensor) -> None:
        """Routing of the tokens a round read: routing (num_moe_layers, R, m, K); read (R, m) bool, the
        columns that held the row's tokens (the last sampled one, then accepted drafts)."""
        if routing is None:
            return
        index = self.lengths[active].unsqueeze(1) - 1 + torch.arange(read.shape[1], device=self.device)  # (R, m)
        keep = read & live.unsqueeze(1) & (index < self.max_new)
        rows, columns = keep.nonzero(as_tuple=True)
        self.decode_routing[:, active[rows], index[rows, columns]] = routing[:, rows, columns]

    def emit(self, active: Tensor, verified: VerifiedTokens, live: Tensor | None = None) -> Tensor:
        """Appends each live batch row's emitted tokens, up to its first stop and the length cap.

        active (R,): the original row of each batch row; live (R,) bool: rows not finished
        before (default all). Returns (R,) bool: rows that finished now.
        """
        rows, width = verified.tokens.shape
        live = torch.ones(rows, dtype=torch.bool, device=self.device) if live is None else live
        start = self.lengths[active]  # (R,)
        index = start.unsqueeze(1) + torch.arange(width, device=self.device)  # (R, m) token index
        take = (torch.arange(width, device=self.device) < verified.counts.unsqueeze(1)) & (index < self.max_new)
        take &= live.unsqueeze(1)
        rows_taken, columns_taken = take.nonzero(as_tuple=True)
        self.tokens[active[rows_taken], index[rows_taken, columns_taken]] = verified.tokens[rows_taken, columns_taken]
        self.logprobs[active[rows_taken], index[rows_taken, columns_taken]] = verified.logprobs[
            rows_taken, columns_taken
        ]
        stop = torch.isin(verified.tokens, self.stop_ids) & take
        if self.stop_strings is not None:
            for column in range(width):
                ends = take[:, column] & ~stop[:, :column].any(dim=1)
                if bool(ends.any()):
                    hits = self.stop_strings.completed(self.tokens[active[ends]], index[ends, column] + 1)
                    stop[ends.nonzero().squeeze(-1), column] |= hits
        stopped = stop.any(dim=1)
        count = torch.where(stopped, stop.long().argmax(dim=1) + 1, take.sum(dim=1))  # tokens kept this round
        if verified.kept is not None:
            kept = take & (torch.arange(width, device=self.device) < count.unsqueeze(1))
            flat = kept.flatten().nonzero().squeeze(-1)  # positions in the round's R * m kept sets
            self.kept.append(((active.unsqueeze(1) * self.max_new + index).flatten()[flat].cpu(),
                              verified.kept.select(flat).to("cpu")))  # fmt: skip
        if width > 1:
            counts = torch.stack((live.long(), live * (width - 1), live * (verified.counts - 1)), dim=1)
            self.draft_counts[active] += counts
        self.lengths[active] = start + count
        self.stopped[active] |= stopped
        return live & (stopped | (self.lengths[active] == self.max_new))

    def groups(self, prompts: list[list[int]], n: int) -> _Groups:
        """The finished rows, grouped by prompt."""
        lengths, tokens, logprobs = self.lengths.cpu(), self.tokens.cpu(), self.logprobs.cpu()
        groups = _Groups(
            completion_ids=[tokens[i, : lengths[i]].tolist() for i in range(len(lengths))],
            logprobs=[logprobs[i, : lengths[i]].clone() for i in range(len(lengths))],
            finish_reason=["stop" if row_stopped else "length" for row_stopped in self.stopped.tolist()],
        )
        if self.prompt_routing is not None:
            groups.routed_experts = _row_routing(prompts, n, self.prompt_routing.cpu(), self.decode_routing.cpu(),
                                                 lengths)  # fmt: skip
        if self.kept:
            groups.kept_tokens = _row_kept_sets(self.kept, lengths, self.max_new)
        groups.drafts = [DraftCounts(*row) for row in self.draft_counts.tolist()]
        return groups


def _row_routing(
    prompts: list[list[int]], n: int, prompt_routing: Tensor, decode_routing: Tensor, lengths: Tensor
) -> list[Tensor]:
    """Per row, the experts used for its prompt tokens then its completion tokens but the last:
    (num_moe_layers, len(prompt) + length - 1, K) int16.

    prompt_routing (L, P, width, K) from the left-padded prefill; decode_routing (L, P * n, max_new, K).
    """
    width = prompt_routing.shape[2]
    rows = []
    for i, prompt in enumerate(prompts):
        prompt_part = prompt_routing[:, i, width - len(prompt) :]
        for row in range(i * n, (i + 1) * n):
            rows.append(torch.cat((prompt_part, decode_routing[:, row, : int(lengths[row]) - 1]), dim=1))
    return rows


def _row_kept_sets(emitted: list[tuple[Tensor, TokenSets]], lengths: Tensor, max_new: int) -> list[TokenSets]:
    """Per row, the kept sets of its completion tokens in order.

    emitted: per emission, the flat index row * max_new + token index of each emitted token and their sets.
    """
    order = torch.cat([index for index, _ in emitted]).argsort()
    return TokenSets.cat([sets for _, sets in emitted]).select(order).split(lengths.tolist())
