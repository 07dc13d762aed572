"""Decode caches sized up front, so a decode step writes one token in place.

transformers' default `DynamicCache` grows by `torch.cat` at every step: each
step copies the whole cache, O(T^2) bytes over a generation, which dominates
decoding of small models on CPU. The rollout engine knows the final length of
every sequence (prompt width + max_new_tokens), so it hands the model a cache
whose buffers already have that capacity:

- our DeepSeek-V3 policy: `policy.LatentCache(num_layers, capacity)`;
- transformers models whose layers all use full attention: a `Cache` of
  `PreallocatedLayer`s, a `DynamicLayer` whose keys/values are views of
  buffers (B, H, capacity, D);
- anything else (sliding-window, hybrid or linear-attention layers): None, and
  the model builds its own cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from r1kit.policy.cache import LatentCache
from r1kit.policy.modeling import DeepseekV3PreTrainedModel


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer backed by (B, H, capacity, D) buffers.

    `keys` / `values` are always views of the first `length` positions, so every
    inherited reader (sequence length, mask sizes) sees a DynamicLayer.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"PreallocatedLayer.capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.length = 0
        self.is_initialized = True
        self._refresh_views()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Writes key/value states (B, H, T, D) after the cached ones; returns all (B, H, length, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"PreallocatedLayer holds {self.capacity} positions; this update needs {end}")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keeps rows `beam_idx` (in that order; repeats allowed) of the batch."""
        if self.is_initialized:
            self._key_buffer = self._key_buffer.index_select(0, beam_idx.to(self.device))
            self._value_buffer = self._value_buffer.index_select(0, beam_idx.to(self.device))
            self._refresh_views()

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last `-tokens_to_remove` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh_views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]


def make_decode_cache(model: nn.Module, capacity: int) -> LatentCache | Cache | None:
    """A cache holding `capacity` positions per row for `model`, or None to let the model build its own."""
    if isinstance(model, DeepseekV3PreTrainedModel):
        return LatentCache(model.config.num_hidden_layers, capacity=capacity)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    text_config = config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        full_attention_only = all(kind == "full_attention" for kind in layer_types)
    else:
        full_attention_only = getattr(text_config, "sliding_window", None) is None
    if not full_attention_only:
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(text_config.num_hidden_layers)])
