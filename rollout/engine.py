"""The contract between the trainer and whatever generates its rollouts.

The trainer hands a `RolloutEngine` tokenised prompts and `SamplingParams` and
gets back a `RolloutBatch`: `params.n` completions per prompt, grouped by prompt
(row `i * n + j` is sample `j` of prompt `i`), each with its token ids, its
text and the log-probability the sampler gave every token it drew. After each
optimizer step the trainer pushes the new weights with `update_weights`, stamped
with a policy version, so every batch says which policy produced it.
`generate_async` lets the trainer sample the next batch while it trains on this
one; an engine never applies new weights in the middle of a batch.

The built-in torch engine, the worker-process client and the vLLM engine all
implement this protocol; the trainer never knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from r1kit.rollout.token_sets import TokenSets

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions.

    n: completions per prompt (GRPO's group size G).
    temperature: softmax temperature; 0 means greedy (top_p, top_k and min_p are then ignored).
    top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution.
    top_k: keep only the k most likely tokens; 0 or -1 (vLLM's "off") keeps them all.
    min_p: drop tokens whose probability is below min_p times the most likely one's,
        in [0, 1]; 0 keeps them all. Truncation runs min-p, top-k, then top-p on what
        is left, renormalised, as vLLM does (rollout/sampling.py).
    max_new_tokens: completion length cap, in tokens.
    stop_token_ids: generation of a sample ends after it emits one of these
        (the stop token is kept in the completion, as EOS is in training).
    stop_strings: generation of a sample also ends once its text contains one
        of these; the token that completes the string is its last token (kept,
        so the text may run a few characters past the string).
    seed: makes sampling reproducible when set.
    record_routing: also return the experts every MoE layer chose for every token
        (keep routing; DeepSeek-V3 policies in the torch engine).
    record_kept_tokens: also return, for every sampled token, the set of tokens the
        truncation (top-k, top-p, min-p) kept (keep sampling mask).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    record_routing: bool = False
    record_kept_tokens: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= 1, or 0 / -1 for off, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass(frozen=True)
class DraftCounts:
    """Speculative decoding of one row: verification rounds, tokens drafted and drafts accepted.

    Each round emits the accepted drafts plus one token, so a row of L tokens took
    rounds = L - 1 - accepted forwards after the prefill (fewer tokens if it stopped mid-round).
    """

    rounds: int
    drafted: int
    accepted: int


@dataclass
class RolloutBatch:
    """Completions for a batch of prompts, `n` per prompt, grouped by prompt.

    All lists have length `num_prompts * n`; row `i * n + j` is sample `j` of prompt `i`.

    prompt_ids: the prompt's token ids (repeated for each of its samples).
    completion_ids: the sampled token ids, stop token included when one was emitted.
    completion_text: the completion decoded without special tokens.
    sampler_logprobs: per completion, a float32 tensor (len(completion_ids[k]),)
        with the log-probability the sampler assigned to each drawn token,
        after temperature and truncation (top-k, top-p, min-p), renormalised:
        log softmax of the tempered logits masked to the token's kept set
        (untempered and untruncated when temperature == 0, greedy).
    finish_reason: "stop" if a stop token or string ended the sample, "length" if the cap did.
    policy_version: the weights version that generated every row of the batch.
    routed_experts: with `record_routing`, per row an int16 tensor (num_moe_layers,
        len(prompt) + len(completion) - 1, K): the experts each MoE layer used for
        every token the model read to sample the completion (the last token is never read).
    kept_tokens: with `record_kept_tokens`, per row a `TokenSets` with one set per
        completion token: the tokens the truncation kept when it was drawn (empty: all).
    draft_counts: with speculative decoding, per row its `DraftCounts`.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_text: list[str]
    sampler_logprobs: list[torch.Tensor]
    finish_reason: list[FinishReason]
    policy_version: int
    routed_experts: list[torch.Tensor] | None = None
    kept_tokens: list[TokenSets] | None = None
    draft_counts: list[DraftCounts] | None = None
    num_generated_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        rows = len(self.completion_ids)
        for name in ("prompt_ids", *_ROW_FIELDS):
            values = getattr(self, name)
            if values is not None and len(values) != rows:
                raise ValueError(f"RolloutBatch.{name} has {len(values)} rows, expected {rows}")
        self.num_generated_tokens = sum(len(ids) for ids in self.completion_ids)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, index: Sequence[int]) -> RolloutBatch:
        """The rows `index`, in that order."""
        return concat_rollouts([self], index)


_ROW_FIELDS = ("completion_ids", "completion_text", "sampler_logprobs", "finish_reason", "routed_experts",
               "kept_tokens", "draft_counts")  # fmt: skip


def concat_rollouts(batches: Sequence[RolloutBatch], index: Sequence[int] | None = None) -> RolloutBatch:
    """One batch of all rows of `batches` (or the rows `index` of them), in order; its policy
    version is the oldest one. Recorded routing and kept sets survive only if every batch has them."""
    columns = {}
    for name in ("prompt_ids", *_ROW_FIELDS):
        parts = [getattr(b, name) for b in batches]
        rows = None if any(part is None for part in parts) else [row for part in parts for row in part]
        columns[name] = rows if rows is None or index is None else [rows[i] for i in index]
    return RolloutBatch(**columns, policy_version=min(b.policy_version for b in batches))


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates grouped completions and accepts new policy weights."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions for each tokenised prompt."""
        ...

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Future[RolloutBatch]:
        """Start `generate` and return at once; weight updates wait until the batch is done."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights (names as in the policy's state_dict) and stamp them `version`."""
        ...

    def close(self) -> None:
        """Release processes, devices and memory held by the engine."""
        ...
