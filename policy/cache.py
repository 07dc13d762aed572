"""The MLA latent cache: per layer and token, the normalised kv latent and the rotated rope key.

For every layer the cache holds one buffer (B, capacity, kv_lora_rank + qk_rope_head_dim):

    entries[..., :kv_lora_rank]   c_KV = RMSNorm(W_DKV h)      the compressed key/value latent
    entries[..., kv_lora_rank:]   k_R  = RoPE(W_KR h)          the rope key shared by all heads

which is 576 values per token per layer for DeepSeek-V3, against
2 * heads * head_dim = 32768 for multi-head attention with the same heads.
The absorbed attention path reads this buffer directly as the keys (all 576
values) and values (the first 512) of a single-head attention.

Buffers are allocated on the first write, sized for `capacity` tokens when the
caller knows it (generation does), and grow by doubling otherwise, so a decode
step writes one token in place instead of re-allocating the cache. Rows can be
dropped or reordered with `select` (finished sequences, beam search); `crop`
removes trailing tokens (speculative decoding).
"""

from __future__ import annotations

import torch


class LatentCache:
    """Latent KV cache for `num_layers` MLA layers; pass it to the policy's forward as `cache`."""

    # What transformers' generate() reads off a cache to choose its path: an eager
    # cache, full attention in every layer, and `crop` restores an earlier state exactly.
    is_compileable = False
    is_croppable = True

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        if num_layers < 1:
            raise ValueError(f"LatentCache.num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.capacity = capacity
        self._buffers: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    def update(self, layer_idx: int, entries: torch.Tensor) -> torch.Tensor:
        """Appends entries (B, T, D) to layer `layer_idx`; returns all its entries (B, past + T, D)."""
        buffer, length = self._buffers[layer_idx], self._lengths[layer_idx]
        new_length = length + entries.shape[1]
        if buffer is None:
            buffer = entries.new_empty(entries.shape[0], max(self.capacity, new_length), entries.shape[2])
        elif buffer.shape[0] != entries.shape[0] or buffer.shape[2] != entries.shape[2]:
            raise ValueError(
                f"LatentCache layer {layer_idx} holds (batch={buffer.shape[0]}, width={buffer.shape[2]}) "
                f"entries, got (batch={entries.shape[0]}, width={entries.shape[2]})"
            )
        elif new_length > buffer.shape[1]:
            grown = buffer.new_empty(buffer.shape[0], max(2 * buffer.shape[1], new_length), buffer.shape[2])
            grown[:, :length] = buffer[:, :length]
            buffer = grown
        buffer[:, length:new_length] = entries
        self._buffers[layer_idx], self._lengths[layer_idx] = buffer, new_length
        return buffer[:, :new_length]

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    def layer_entries(self, layer_idx: int) -> torch.Tensor | None:
        """The cached entries (B, S, D) of one layer, or None before its first write."""
        buffer = self._buffers[layer_idx]
        return None if buffer is None else buffer[:, : self._lengths[layer_idx]]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (the same for every row; left padding is masked, not skipped)."""
        return self._lengths[layer_idx]

    def select(self, indices: torch.Tensor) -> LatentCache:
        """Keeps (and reorders) the batch rows `indices` (R,) in every layer; returns self."""
        for i, buffer in enumerate(self._buffers):
            if buffer is not None:
                self._buffers[i] = buffer.index_select(0, indices.to(buffer.device))
        return self

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """transformers' beam-search hook: same as `select`."""
        self.select(beam_idx)

    def crop(self, max_length: int) -> None:
        """Keeps the first `max_length` positions (a negative value drops that many from the end)."""
        for i, length in enumerate(self._lengths):
            keep = length + max_length if max_length < 0 else max_length
            self._lengths[i] = max(0, min(length, keep))
