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

import torch
from torch import Tensor, nn

from r1kit.policy.transformers_compat import CACHE_NAME
from r1kit.rollout.engine import FinishReason, RolloutBatch, SamplingParams
from r1kit.rollout.kv_cache import make_decode_cache
from r1kit.rollout.sampling import sample_next_tokens
from r1kit.rollout.stop_strings import StopStrings


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
        completions: list[list[int]] = []
        logprobs: list[Tensor] = []
        reasons: list[FinishReason] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(prompts), prompts_per_batch):
                    chunk = [list(p) for p in prompts[start : start + prompts_per_batch]]
                    ids, lps, why = self._generate_groups(chunk, params, generator)
                    completions += ids
                    logprobs += lps
                    reasons += why
        finally:
            self.model.train(was_training)
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(params.n)],
            completion_ids=completions,
            completion_text=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            sampler_logprobs=logprobs,
            finish_reason=reasons,
            policy_version=self.policy_version,
        )

    def _prefill(self, prompts: list[list[int]], n: int, capacity: int) -> tuple[Tensor, object, Tensor, Tensor]:
        """Runs each prompt once and repeats its cache rows n times.

        Returns (logits (P*n, V) of the next token, cache, attention_mask
        buffer (P*n, capacity) with the prompt columns filled, next position (P*n,)).
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
        )
        cache, logits = getattr(out, CACHE_NAME), out.logits[:, -1]
        rows = torch.arange(num_prompts, device=self.device).repeat_interleave(n)  # row i*n+j -> prompt i
        if n > 1:
            cache.reorder_cache(rows)
        return logits[rows], cache, attention_mask[rows], positions[rows, -1] + 1

    def _generate_groups(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[list[int]], list[Tensor], list[FinishReason]]:
        """Decodes `params.n` samples of each prompt; returns per-row completion ids, sampler log-probs and
        finish reasons."""
        width, max_new = max(len(p) for p in prompts), params.max_new_tokens
        logits, cache, attention_mask, next_position = self._prefill(prompts, params.n, width + max_new)
        num_rows = logits.shape[0]
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        stop_strings = StopStrings(self.tokenizer, params.stop_strings) if params.stop_strings else None
        active = torch.arange(num_rows, device=self.device)  # original row of each batch row
        tokens = torch.full((num_rows, max_new), -1, dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros((num_rows, max_new), device=self.device)
        lengths = torch.full((num_rows,), max_new, dtype=torch.long, device=self.device)

        stopped = torch.zeros(num_rows, dtype=torch.bool)  # per original row: ended by a stop token or string
        done = torch.zeros(num_rows, dtype=torch.bool, device=self.device)  # per batch row
        for step in range(max_new):
            new_tokens, new_logprobs = sample_next_tokens(
                logits, temperature=params.temperature, top_p=params.top_p, generator=generator
            )
            tokens[active, step] = new_tokens  # rows already done write past their length: never read
            token_logprobs[active, step] = new_logprobs
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
            )
            cache, logits = getattr(out, CACHE_NAME), out.logits[:, -1]
            next_position = next_position + 1

        lengths, tokens, token_logprobs = lengths.cpu(), tokens.cpu(), token_logprobs.cpu()
        return (
            [tokens[i, : lengths[i]].tolist() for i in range(num_rows)],
            [token_logprobs[i, : lengths[i]].clone() for i in range(num_rows)],
            ["stop" if row_stopped else "length" for row_stopped in stopped.tolist()],
        )

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
