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
from r1kit.rollout.engine import FinishReason, RolloutBatch, SamplingParams
from r1kit.rollout.kv_cache import make_decode_cache
from r1kit.rollout.sampling import sample_next_tokens
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
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch_rows: int = 256) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.model = model
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
        )

    def _prefill(
        self, prompts: list[list[int]], n: int, capacity: int, record_routing: bool
    ) -> tuple[Tensor, object, Tensor, Tensor, Tensor | None]:
        """Runs each prompt once and repeats its cache rows n times.

        Returns (logits (P*n, V) of the next token, cache, attention_mask
        buffer (P*n, capacity) with the prompt columns filled, next position (P*n,),
        and with `record_routing` the prompts' routed experts (num_moe_layers, P, width, K)).
        """
        num_prompts, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((num_prompts, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_prompts, capacity), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) : width] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (attention_mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask[:, :width],
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_NAME: make_decode_cache(self.model, capacity)},
            **({"output_routed_experts": True} if record_routing else {}),
        )
        cache, logits = getattr(out, CACHE_NAME), out.logits[:, -1]
        rows = torch.arange(num_prompts, device=self.device).repeat_interleave(n)  # row i*n+j -> prompt i
        if n > 1:
            cache.reorder_cache(rows)
        routing = out.routed_experts if record_routing else None
        return logits[rows], cache, attention_mask[rows], positions[rows, -1] + 1, routing

    def _generate_groups(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None
    ) -> _Groups:
        """Decodes `params.n` samples of each prompt (rows grouped by prompt)."""
        width, max_new = max(len(p) for p in prompts), params.max_new_tokens
        logits, cache, attention_mask, next_position, prompt_routing = self._prefill(
            prompts, params.n, width + max_new, params.record_routing
        )
        num_rows = logits.shape[0]
        decode_routing = None  # (num_moe_layers, rows, max_new, K): experts used when reading each sampled token
        if prompt_routing is not None:
            decode_routing = prompt_routing.new_full((*prompt_routing.shape[:1], num_rows, max_new,
                                                      prompt_routing.shape[-1]), -1)  # fmt: skip
        step_kept: list[tuple[Tensor, TokenSets]] = []  # (batch rows' original rows, their kept sets) per step
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        stop_strings = StopStrings(self.tokenizer, params.stop_strings) if params.stop_strings else None
        active = torch.arange(num_rows, device=self.device)  # original row of each batch row
        tokens = torch.full((num_rows, max_new), -1, dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros((num_rows, max_new), device=self.device)
        lengths = torch.full((num_rows,), max_new, dtype=torch.long, device=self.device)

        stopped = torch.zeros(num_rows, dtype=torch.bool)  # per original row: ended by a stop token or string
        done = torch.zeros(num_rows, dtype=torch.bool, device=self.device)  # per batch row
        for step in range(max_new):
            sampled = sample_next_tokens(
                logits,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                generator=generator,
                return_kept=params.record_kept_tokens,
            )
            new_tokens = sampled.tokens
            tokens[active, step] = new_tokens  # rows already done write past their length: never read
            token_logprobs[active, step] = sampled.logprobs
            if sampled.kept is not None:
                step_kept.append((active.cpu(), sampled.kept.to("cpu")))
            finished_now = torch.isin(new_tokens, stop_ids) & ~done
            if stop_strings is not None:
                finished_now |= stop_strings.completed(tokens[active, : step + 1]) & ~done
            lengths[active[finished_now]] = step + 1
            stopped[active[finished_now].cpu()] = True
            done |= finished_now
            if step + 1 == max_new or bool(done.all()):
                break
            if 4 * int(done.sum()) >= len(active):  # drop finished rows from the batch and the cache
                keep = (~done).nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                active, new_tokens, next_position = active[keep], new_tokens[keep], next_position[keep]
                attention_mask, done = attention_mask[keep], done[keep]
            attention_mask[:, width + step] = (~done).long()
            out = self.model(
                input_ids=new_tokens.unsqueeze(-1),
                attention_mask=attention_mask[:, : width + step + 1],
                position_ids=next_position.unsqueeze(-1),
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_NAME: cache},
                **({"output_routed_experts": True} if decode_routing is not None else {}),
            )
            cache, logits = getattr(out, CACHE_NAME), out.logits[:, -1]
            if decode_routing is not None:
                decode_routing[:, active, step] = out.routed_experts[:, :, 0]
            next_position = next_position + 1

        lengths, tokens, token_logprobs = lengths.cpu(), tokens.cpu(), token_logprobs.cpu()
        groups = _Groups(
            completion_ids=[tokens[i, : lengths[i]].tolist() for i in range(num_rows)],
            logprobs=[token_logprobs[i, : lengths[i]].clone() for i in range(num_rows)],
            finish_reason=["stop" if row_stopped else "length" for row_stopped in stopped.tolist()],
        )
        if prompt_routing is not None:
            groups.routed_experts = _row_routing(prompts, params.n, prompt_routing.cpu(), decode_routing.cpu(), lengths)
        if params.record_kept_tokens:
            groups.kept_tokens = _row_kept_sets(step_kept, lengths, max_new)
        return groups

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
class _Groups:
    """What `_generate_groups` returns: one entry per row, rows grouped by prompt."""

    completion_ids: list[list[int]]
    logprobs: list[Tensor]
    finish_reason: list[FinishReason]
    routed_experts: list[Tensor] = field(default_factory=list)
    kept_tokens: list[TokenSets] = field(default_factory=list)


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


def _row_kept_sets(step_kept: list[tuple[Tensor, TokenSets]], lengths: Tensor, max_new: int) -> list[TokenSets]:
    """Per row, the kept sets of its completion tokens in order, from the per-step sets of the batch rows.

    step_kept: for each decode step, the original row of each batch row (R_s,) and their sets.
    """
    rows = torch.cat([active for active, _ in step_kept])
    steps = torch.cat([torch.full_like(active, step) for step, (active, _) in enumerate(step_kept)])
    sets = TokenSets.cat([kept for _, kept in step_kept])
    valid = steps < lengths[rows]  # rows stay in the batch a while after they finish
    order = (rows * max_new + steps)[valid].argsort()
    return sets.select(valid.nonzero().squeeze(-1)[order]).split(lengths.tolist())
