"""From a RolloutBatch to the padded tensors the policy forward takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r1kit.rollout.engine import RolloutBatch


@dataclass
class PolicyBatch:
    """N sequences laid out as [left-padded prompt (P) | right-padded completion (T)].

    input_ids, attention_mask, position_ids: (N, P + T); positions count real tokens only.
    completion_mask: (N, T) float, 1 on completion tokens.
    sampler_logprobs: (N, T) float32 log-probs the rollout engine reported (0 on padding).
    truncated: (N,) bool, completions cut by the length cap rather than a stop token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_mask: Tensor
    sampler_logprobs: Tensor
    truncated: Tensor
    prompt_length: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: slice | Tensor) -> PolicyBatch:
        """The sub-batch of the given rows, trimmed to the longest remaining completion."""
        completion = self.completion_mask[index]
        keep = max(int(completion.sum(dim=1).max()), 1)
        end = self.prompt_length + keep
        return PolicyBatch(
            input_ids=self.input_ids[index, :end],
            attention_mask=self.attention_mask[index, :end],
            position_ids=self.position_ids[index, :end],
            completion_mask=completion[:, :keep],
            sampler_logprobs=self.sampler_logprobs[index, :keep],
            truncated=self.truncated[index],
            prompt_length=self.prompt_length,
        )

    def to(self, device: torch.device | str) -> PolicyBatch:
        return PolicyBatch(
            **{
                name: getattr(self, name).to(device)
                for name in (
                    "input_ids",
                    "attention_mask",
                    "position_ids",
                    "completion_mask",
                    "sampler_logprobs",
                    "truncated",
                )
            },
            prompt_length=self.prompt_length,
        )


def build_policy_batch(rollout: RolloutBatch, pad_token_id: int) -> PolicyBatch:
    """Pad prompts on the left and completions on the right into one (N, P + T) batch."""
    n = len(rollout)
    prompt_length = max(len(p) for p in rollout.prompt_ids)
    completion_length = max(max(len(c) for c in rollout.completion_ids), 1)
    input_ids = torch.full((n, prompt_length + completion_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((n, completion_length))
    sampler_logprobs = torch.zeros((n, completion_length))
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids, strict=True)):
        start = prompt_length - len(prompt)
        input_ids[i, start:prompt_length] = torch.tensor(prompt)
        input_ids[i, prompt_length : prompt_length + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[i, start : prompt_length + len(completion)] = 1
        completion_mask[i, : len(completion)] = 1
        sampler_logprobs[i, : len(completion)] = rollout.sampler_logprobs[i]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    truncated = torch.tensor([reason == "length" for reason in rollout.finish_reason])
    return PolicyBatch(
        input_ids, attention_mask, position_ids, completion_mask, sampler_logprobs, truncated, prompt_length
    )
