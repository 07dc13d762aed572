"""MLA: the absorbed path over the latent cache reproduces the expanded path; masks; the cache itself."""

from __future__ import annotations

import pytest
import torch

from r1kit.policy.attention import MultiheadLatentAttention, build_attention_mask
from r1kit.policy.cache import LatentCache
from r1kit.policy.rope import RotaryEmbedding


def left_padded(batch: int, seq: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_mask_is_none_when_causal_order_suffices():
    assert build_attention_mask(None, 0, 5) is None
    assert build_attention_mask(torch.ones(2, 9), 8, 1) is None
    causal = build_attention_mask(None, 3, 2)
    assert causal.shape == (1, 1, 2, 5)
    assert causal[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


def test_padded_keys_are_hidden_but_every_query_sees_itself():
    mask = build_attention_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 0, 4)
    assert mask[0, 0].tolist() == [
        [True, False, False, False],  # a padded query sees only itself: finite softmax
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert mask[1, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_mask_width_must_cover_past_and_new_tokens():
    with pytest.raises(ValueError, match="expected past"):
        build_attention_mask(torch.ones(2, 4), 4, 1)


@pytest.mark.parametrize("interleave", [True, False])
def test_absorbed_decoding_reproduces_expanded_attention(tiny_config, yarn, randomized, interleave):
    config = tiny_config(rope_parameters=yarn, rope_interleave=interleave)
    attention = MultiheadLatentAttention(config, layer_idx=0).eval()
    randomized(attention)
    rotary = RotaryEmbedding(config)
    batch, seq = 3, 10
    x = torch.randn(batch, seq, config.hidden_size)
    mask2d, positions = left_padded(batch, seq, [0, 3, 6])
    real = mask2d.bool()
    with torch.no_grad():
        expanded = attention(x, rotary(positions, x.dtype), build_attention_mask(mask2d, 0, seq))
        cache = LatentCache(num_layers=1)
        stepped = []
        for t in range(seq):  # token 0 runs expanded on an empty cache, every later one absorbed
            rope = rotary(positions[:, t : t + 1], x.dtype)
            stepped.append(attention(x[:, t : t + 1], rope, build_attention_mask(mask2d[:, : t + 1], t, 1), cache))
    torch.testing.assert_close(torch.cat(stepped, dim=1)[real], expanded[real], rtol=0, atol=1e-5)


def test_absorbed_chunk_after_a_prefill_matches_expanded(tiny_config, randomized):
    config = tiny_config()
    attention = MultiheadLatentAttention(config, layer_idx=0).eval()
    randomized(attention)
    rotary = RotaryEmbedding(config)
    x = torch.randn(2, 9, config.hidden_size)
    positions = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        expanded = attention(x, rotary(positions, x.dtype), None)
        cache = LatentCache(num_layers=1)
        first = attention(x[:, :5], rotary(positions[:, :5], x.dtype), None, cache)
        chunk = attention(x[:, 5:], rotary(positions[:, 5:], x.dtype), build_attention_mask(None, 5, 4), cache)
    torch.testing.assert_close(torch.cat((first, chunk), dim=1), expanded, rtol=0, atol=1e-5)


def test_cache_holds_normed_latent_and_rotated_rope_key(tiny_config, randomized):
    config = tiny_config()
    attention = MultiheadLatentAttention(config, layer_idx=0).eval()
    randomized(attention)
    rotary = RotaryEmbedding(config)
    x = torch.randn(2, 4, config.hidden_size)
    rope = rotary(torch.arange(4).expand(2, -1), x.dtype)
    cache = LatentCache(num_layers=1)
    with torch.no_grad():
        attention(x, rope, None, cache)
        latent, k_rope = attention.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], -1)
    entries = cache.layer_entries(0)
    assert entries.shape == (2, 4, config.kv_lora_rank + config.qk_rope_head_dim)
    torch.testing.assert_close(entries[..., : config.kv_lora_rank], attention.kv_a_layernorm(latent))
    assert not torch.allclose(entries[..., config.kv_lora_rank :], k_rope)  # rotated, not raw


def test_cache_grows_by_doubling_and_keeps_its_contents():
    cache = LatentCache(num_layers=1)
    first = torch.randn(2, 3, 5)
    cache.update(0, first)
    for _ in range(4):
        cache.update(0, torch.randn(2, 1, 5))
    assert cache._buffers[0].shape[1] == 12  # 3 -> 6 -> 12
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(cache.layer_entries(0)[:, :3], first)


def test_preallocated_cache_writes_in_place():
    cache = LatentCache(num_layers=2, capacity=16)
    cache.update(1, torch.randn(4, 10, 6))
    storage = cache._buffers[1].data_ptr()
    for _ in range(6):
        cache.update(1, torch.randn(4, 1, 6))
    assert cache._buffers[1].data_ptr() == storage and cache.get_seq_length(1) == 16


def test_cache_select_crop_and_shape_errors():
    cache = LatentCache(num_layers=1)
    entries = torch.randn(3, 4, 5)
    cache.update(0, entries)
    cache.select(torch.tensor([2, 0]))
    torch.testing.assert_close(cache.layer_entries(0), entries[[2, 0]])
    cache.reorder_cache(torch.tensor([1]))
    torch.testing.assert_close(cache.layer_entries(0), entries[[0]])
    cache.crop(-1)
    assert cache.get_seq_length() == 3
    cache.crop(2)
    torch.testing.assert_close(cache.layer_entries(0), entries[[0], :2])
    with pytest.raises(ValueError, match="batch=1"):
        cache.update(0, torch.randn(2, 1, 5))
