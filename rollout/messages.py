"""Control messages between the trainer's client and a rollout worker.

They travel pickled over a `multiprocessing.connection` socket, after its
HMAC challenge with the shared authkey; no weight ever does (weights go over
the process group, see rollout/sync_group.py). Every request gets exactly one
reply, in order: the reply named below, or `Failure`.

    Hello                -> WorkerInfo
    Generate             -> Generated
    JoinSyncGroup        -> Done      (after the group formed)
    ReceiveWeights       -> WeightsLoaded (after the last bucket is loaded)
A worker busy with another trainer answers the first request with Failure("busy").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from r1kit.rollout.buckets import Bucket
from r1kit.rollout.engine import DraftCounts, FinishReason, RolloutBatch, SamplingParams
from r1kit.rollout.sync_group import Rendezvous
from r1kit.rollout.token_sets import TokenSets

AUTHKEY_ENV = "R1KIT_ROLLOUT_AUTHKEY"


@dataclass(frozen=True)
class Hello:
    pass


@dataclass(frozen=True)
class WorkerInfo:
    """engine: "torch" or "vllm"; device: where its weights live; num_receivers: its ranks in a sync group."""

    engine: str
    model: str
    device: str
    num_receivers: int
    policy_version: int
    pid: int


@dataclass(frozen=True)
class Generate:
    prompts: list[list[int]]
    params: SamplingParams


@dataclass(frozen=True)
class Generated:
    """A RolloutBatch without its prompts (the client has them).

    Tensors travel as numpy arrays (log-probs as raw float32 bytes): a pickled torch
    tensor would go through torch's shared-memory reducers, which need a second
    connection. Recorded routing is int16 (layers, tokens, K); a kept set is its
    (ids int32, offsets int64) pair.
    """

    completion_ids: list[list[int]]
    completion_text: list[str]
    sampler_logprobs: list[bytes]
    finish_reason: list[FinishReason]
    policy_version: int
    routed_experts: list[np.ndarray] | None = None
    kept_tokens: list[tuple[np.ndarray, np.ndarray]] | None = None
    draft_counts: list[DraftCounts] | None = None

    @classmethod
    def from_batch(cls, batch: RolloutBatch) -> Generated:
        return cls(
            completion_ids=batch.completion_ids,
            completion_text=batch.completion_text,
            sampler_logprobs=[lp.detach().to("cpu", torch.float32).numpy().tobytes() for lp in batch.sampler_logprobs],
            finish_reason=batch.finish_reason,
            policy_version=batch.policy_version,
            routed_experts=None if batch.routed_experts is None else [row.numpy() for row in batch.routed_experts],
            kept_tokens=None
            if batch.kept_tokens is None
            else [(row.ids.numpy(), row.offsets.numpy()) for row in batch.kept_tokens],
            draft_counts=batch.draft_counts,
        )

    def to_batch(self, prompts: list[list[int]], n: int) -> RolloutBatch:
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(n)],
            completion_ids=self.completion_ids,
            completion_text=self.completion_text,
            sampler_logprobs=[_float32(raw) for raw in self.sampler_logprobs],
            finish_reason=self.finish_reason,
            policy_version=self.policy_version,
            routed_experts=None if self.routed_experts is None else [torch.from_numpy(r) for r in self.routed_experts],
            kept_tokens=None
            if self.kept_tokens is None
            else [TokenSets(torch.from_numpy(ids), torch.from_numpy(offsets)) for ids, offsets in self.kept_tokens],
            draft_counts=self.draft_counts,
        )


def _float32(raw: bytes) -> torch.Tensor:
    if not raw:  # frombuffer rejects an empty buffer
        return torch.zeros(0, dtype=torch.float32)
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


@dataclass(frozen=True)
class JoinSyncGroup:
    """Join `rendezvous` with ranks first_rank .. first_rank + num_receivers - 1."""

    rendezvous: Rendezvous
    first_rank: int


@dataclass(frozen=True)
class ReceiveWeights:
    """Receive `plan` bucket by bucket over the sync group, load it, then serve it as `version`."""

    version: int
    plan: list[Bucket]


@dataclass(frozen=True)
class WeightsLoaded:
    version: int


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Failure:
    """error: the exception type (or "busy"); message: what went wrong, for the trainer's error."""

    error: str
    message: str
