"""Preallocated decode caches: the same logits as transformers' DynamicCache, through reorders and crops."""

import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from r1kit.policy import DeepseekV3ForCausalLM, LatentCache, preset_config
from r1kit.policy.transformers_compat import CACHE_NAME
from r1kit.rollout.kv_cache import PreallocatedLayer, make_decode_cache
from tests.rollout.test_torch_engine import tiny_llama


def decode(model, cache, steps: int = 4) -> list[torch.Tensor]:
    """Prefill 3 rows, repeat row 0 and drop row 1 (as the engine does), then decode; returns every step's logits."""
    torch.manual_seed(0)
    ids = torch.randint(2, 128, (3, 5))
    out = model(input_ids=ids, use_cache=True, **{CACHE_NAME: cache})
    cache, logits = getattr(out, CACHE_NAME), [out.logits[:, -1]]
    rows = torch.tensor([0, 0, 2])
    cache.reorder_cache(rows)
    tokens = ids[rows, -1:]
    for step in range(steps):
        positions = torch.full((3, 1), 5 + step)
        out = model(input_ids=tokens, position_ids=positions, use_cache=True, **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        logits.append(out.logits[:, -1])
        tokens = out.logits[:, -1:].argmax(-1)
    return logits


def test_preallocated_layers_decode_like_the_dynamic_cache() -> None:
    model = tiny_llama()
    cache = make_decode_cache(model, capacity=16)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    with torch.no_grad():
        ours, reference = decode(model, cache), decode(model, DynamicCache(config=model.config))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 9


def test_crop_and_capacity() -> None:
    layer = PreallocatedLayer(capacity=4)
    keys = torch.randn(2, 1, 3, 8)
    layer.update(keys, keys)
    layer.crop(-1)
    assert layer.get_seq_length() == 2 and torch.equal(layer.keys, keys[:, :, :2])
    layer.update(keys[:, :, :2], keys[:, :, :2])
    try:
        layer.update(keys[:, :, :1], keys[:, :, :1])
    except ValueError as error:
        assert "holds 4 positions" in str(error)
    else:
        raise AssertionError("an update past the capacity must raise")


def test_cache_choice_per_model() -> None:
    assert isinstance(make_decode_cache(DeepseekV3ForCausalLM(preset_config("tiny-debug")), 8), LatentCache)
    sliding = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    assert make_decode_cache(MistralForCausalLM(sliding), 8) is None  # the model keeps its own window cache
