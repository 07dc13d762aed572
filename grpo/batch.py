"""From a RolloutBatch to the padded tensors the policy forward takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r1kit.rollout.engine import RolloutBatch
from r1kit.rollout.token_sets import TokenSets


@dataclass
class PolicyBatch:
    """N sequences laid out as [left-padded prompt (P) | right-padded completion (T)].

    input_ids, attention_mask, position_ids: (N, P + T); positions count real tokens only.
    completion_mask: (N, T) float, 1 on completion tokens.
    sampler_logprobs: (N, T) float32 log-probs the rollout engine reported (0 on padding).
    truncated: (N,) bool, completions cut by the length cap rather than a stop token.
    routed_experts: (num_moe_layers, N, P + T, K) int16 experts the sampler used
        for each token (keep routing), -1 where the trainer's routers choose; or None.
    kept_tokens: the sampler's kept set of each completion position, over the
        (N, T) grid flattened row-major (keep sampling mask); or None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_mask: Tensor
    sampler_logprobs: Tensor
    truncated: Tensor
    prompt_length: int
    routed_experts: Tensor | None = None
    kept_tokens: TokenSets | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: slice | Tensor) -> PolicyBatch:
        """The sub-batch of the given rows, trimmed to the longest remaining completion."""
        completion = self.completion_mask[index]
        keep = max(int(completion.sum(dim=1).max()), 1)
        end = self.prompt_length + keep
        kept_tokens = None
        if self.kept_tokens is not None:
            width = self.completion_mask.shape[1]
            grid_rows = torch.arange(len(self))[index].unsqueeze(1)  # (n, 1)
            kept_tokens = self.kept_tokens.select((grid_rows * width + torch.arange(keep)).flatten())
        return PolicyBatch(
            input_ids=self.input_ids[index, :end],
            attention_mask=self.attention_mask[index, :end],
            position_ids=self.position_ids[index, :end],
            completion_mask=completion[:, :keep],
            sampler_logprobs=self.sampler_logprobs[index, :keep],
            truncated=self.truncated[index],
            prompt_length=self.prompt_length,
            routed_experts=None if self.routed_experts is None else self.routed_experts[:, index, :end],
            kept_tokens=kept_tokens,
        )

    def to(self, device: torch.device | str) -> PolicyBatch:
        tensors = ("input_ids", "attention_mask", "position_ids", "completion_mask", "sampler_logprobs",
                   "truncated", "routed_experts", "kept_tokens")  # fmt: skip
        moved = {name: getattr(self, name) for name in tensors}
        return PolicyBatch(
            **{name: None if value is None else value.to(device) for name, value in moved.items()},
            prompt_length=self.prompt_length,
        )


def build_policy_batch(rollout: RolloutBatch, pad_token_id: int) -> PolicyBatch:
    """Pad prompts on the left and completions on the right into one (N, P + T) batch, with the
    sampler's recorded routing and kept sets in the same layout when the rollout has them."""
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
    kept_tokens = None if rollout.kept_tokens is None else TokenSets.grid(rollout.kept_tokens, completion_length)
    return PolicyBatch(
        input_ids, attention_mask, position_ids, completion_mask, sampler_logprobs, truncated, prompt_length,
        routed_experts=routing_grid(rollout, prompt_length, input_ids.shape[1]), kept_tokens=kept_tokens,
    )  # fmt: skip


def routing_grid(rollout: RolloutBatch, prompt_length: int, width: int) -> Tensor | None:
    """The rows' recorded routing (num_moe_layers, len(prompt) + len(completion) - 1, K) placed in
    the (num_moe_layers, N, width, K) layout of the batch, -1 elsewhere; None without recorded routing."""
    if rollout.routed_experts is None:
        return None
    layers, _, top_k = rollout.routed_experts[0].shape
    grid = torch.full((layers, len(rollout), width, top_k), -1, dtype=torch.int16)
    for i, (prompt, routing) in enumerate(zip(rollout.prompt_ids, rollout.routed_experts, strict=True)):
        start = prompt_length - len(prompt)
        grid[:, i, start : start + routing.shape[1]] = routing
    return grid
