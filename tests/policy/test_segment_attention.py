"""Attention over packed rows one sequence at a time equals attention under the dense block-diagonal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.attention import PackedSequences, attention_layout, build_attention_mask
from r1kit.policy.segment_attention import SegmentLayout

# (position_ids, attention_mask) of two rows each: packed samples, prompts shared by completions, padding
ROWS = {
    "packed": ([[0, 1, 2, 3, 0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]], None),
    "shared prompts": ([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1], [0, 1, 2, 2, 3, 4, 5, 2, 3, 2]], None),
    "shared prompts, tail padding": (
        [[0, 1, 2, 3, 4, 3, 4, 0, 0, 0], [0, 1, 2, 3, 0, 1, 2, 2, 2, 2]],
        [[1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]],
    ),
    "a row of padding only": ([[0, 1, 2, 3, 4, 3, 4, 0, 1, 2], [0] * 10], [[1] * 10, [0] * 10]),
    "left padding": ([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], [[0, 0] + [1] * 8, [1] * 10]),
}


def attention_inputs(rows: str, heads: int = 3, width: int = 8, seed: int = 0):
    positions, mask = ROWS[rows]
    positions = torch.tensor(positions)
    mask = None if mask is None else torch.tensor(mask)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*positions.shape, heads, width, generator=generator, requires_grad=True) for _ in range(3))
    return positions, mask, q, k, v


def dense_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("rows", sorted(ROWS))
def test_one_sequence_at_a_time_equals_the_dense_mask_with_its_gradients(rows):
    positions, mask, q, k, v = attention_inputs(rows)
    dense_mask = build_attention_mask(mask, 0, positions.shape[1], positions)
    layout = SegmentLayout.from_sequences(PackedSequences.from_positions(positions, mask), mask)
    real = torch.ones(positions.shape, dtype=torch.bool) if mask is None else mask.bool()
    weights = torch.randn(*q.shape[:3], v.shape[-1]) * real[..., None, None]  # a loss over the real tokens only
    expected = dense_attention(q, k, v, dense_mask)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    got = layout.attend(q, k, v, scale=q.shape[-1] ** -0.5)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_each_sequence_is_one_entry_with_its_prefix_keys_first():
    # prompt + first completion at positions 0 1 2 3, a second completion at position 2 continuing the prompt (0 1)
    layout = SegmentLayout.from_sequences(PackedSequences.from_positions(torch.tensor([[0, 1, 2, 3, 2]])))
    assert layout.num_entries == 2
    keys = layout.key_index.view(2, -1).tolist()  # K = 4: the longer entry
    assert keys[0] == [0, 1, 2, 3]
    assert keys[1][:3] == [0, 1, 4]  # the shared prompt's tokens, then its own
    assert layout.mask[1, 0, 0].tolist() == [True, True, True, False]
    assert layout.mask[0, 0].tril().equal(layout.mask[0, 0])  # causal
    assert layout.slot.tolist() == [0, 1, 2, 3, 4]  # Q = 4: entry e's query i sits in slot 4 e + i


def test_long_rows_of_short_sequences_take_the_segments_and_short_rows_the_dense_mask():
    long_row = torch.arange(40).repeat(12)[None]  # 12 samples of 40 tokens in a row of 480
    assert isinstance(attention_layout(None, 0, 480, long_row), SegmentLayout)
    short_row = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])  # an entry's overhead outweighs what it saves
    assert isinstance(attention_layout(None, 0, 10, short_row), torch.Tensor)
    assert attention_layout(None, 0, 5, torch.arange(5)[None]) is None  # one sample: plain causal
    decoding = attention_layout(torch.tensor([[0, 1, 1, 1]]), 3, 1, torch.tensor([[2]]))
    assert isinstance(decoding, torch.Tensor)  # a past: the dense mask over the cache


def test_a_long_row_of_completions_sharing_a_prompt_computes_what_separate_rows_do(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config())
    randomized(model)
    model.eval()
    prompt, lengths = 16, [30, 24, 35, 28, 31, 22, 33, 30, 26, 34, 29, 27]
    completions = [torch.randint(3, model.config.vocab_size, (n,)) for n in lengths]
    prompt_ids = torch.randint(3, model.config.vocab_size, (prompt,))
    ids = torch.cat([prompt_ids, *completions])[None]  # the prompt once, then every completion continuing it
    positions = torch.cat([torch.arange(prompt + n) if i == 0 else torch.arange(prompt, prompt + n)
                           for i, n in enumerate(lengths)])[None]  # fmt: skip
    assert isinstance(attention_layout(None, 0, ids.shape[1], positions), SegmentLayout)
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits[0]
        start = prompt
        for completion in completions:
            alone = model(torch.cat([prompt_ids, completion])[None]).logits[0]
            torch.testing.assert_close(packed[start : start + len(completion)], alone[prompt:], atol=1e-5, rtol=1e-5)
            start += len(completion)
        torch.testing.assert_close(packed[:prompt], alone[:prompt], atol=1e-5, rtol=1e-5)


def test_one_row_of_positions_serves_every_row_of_the_batch(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config())
    randomized(model)
    model.eval()
    positions = torch.arange(40).repeat(12)[None]  # (1, 480): long enough for the segments
    ids = torch.randint(3, model.config.vocab_size, (2, 480))
    with torch.no_grad():
        batched = model(ids, position_ids=positions).logits
        for row in range(2):
            alone = model(ids[row : row + 1], position_ids=positions).logits[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)
