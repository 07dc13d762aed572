"""Packed rows: samples whose position_ids restart at 0 never attend to, or predict, one another."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.attention import PackedSequences, build_attention_mask, packed_sequence_ids

LENGTHS = (5, 3, 4)  # three samples packed into one row of 12 tokens


def packed_positions(lengths: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)


def test_sequence_ids_start_wherever_positions_do_not_step_by_one():
    assert packed_sequence_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist() == [[0, 0, 0, 1, 1, 2]]
    left_padded = torch.tensor([[0, 0, 0, 1, 2]])  # cumsum positions: the real tokens stay one sequence
    assert packed_sequence_ids(left_padded).tolist() == [[0, 1, 2, 2, 2]]


def test_packed_positions_give_a_block_diagonal_causal_mask():
    mask = build_attention_mask(None, 0, 6, torch.tensor([[0, 1, 2, 0, 1, 0]]))
    block = lambda n: torch.ones(n, n, dtype=torch.bool).tril()
    assert mask[0, 0].equal(torch.block_diag(block(3), block(2), block(1)))
    # padding (its own trailing sequence here) stays hidden from every real query
    padded = build_attention_mask(torch.tensor([[1, 1, 1, 1, 0, 0]]), 0, 6, torch.tensor([[0, 1, 0, 1, 0, 1]]))
    assert padded[0, 0].equal(torch.block_diag(block(2), block(2), torch.eye(2, dtype=torch.bool)))


def test_contiguous_positions_keep_the_plain_causal_fast_path():
    assert build_attention_mask(None, 0, 5, torch.arange(3, 8)[None]) is None
    assert build_attention_mask(None, 4, 1, torch.tensor([[0]])) is None  # decoding: positions are not packing


def per_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token t+1 | ..t) for one row: logits (T, V), ids (T,) -> (T - 1,)."""
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")


def packed_sample_losses(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's per-token losses from one forward over the packed row `ids` (1, T)."""
    with torch.no_grad():
        logits = model(ids, position_ids=packed_positions(LENGTHS)).logits[0]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    return [per_token_loss(logits[a:b], ids[0, a:b]) for a, b in itertools.pairwise(starts)]


def test_packed_forward_equals_separate_forwards_and_samples_never_see_each_other(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config())
    randomized(model)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (1, sum(LENGTHS)))
    packed = packed_sample_losses(model, ids)
    separate = [ids[:, :5], ids[:, 5:8], ids[:, 8:]]
    for sample, losses in zip(separate, packed, strict=True):
        with torch.no_grad():
            alone = per_token_loss(model(sample).logits[0], sample[0])
        torch.testing.assert_close(losses, alone, atol=1e-5, rtol=1e-5)

    perturbed = ids.clone()
    perturbed[0, :5] = torch.randint(3, model.config.vocab_size, (5,))
    after = packed_sample_losses(model, perturbed)
    assert not torch.allclose(after[0], packed[0])
    # unchanged but for the MoE GEMMs' summation order (other tokens share the experts); attention across
    # samples would move these losses by ~0.1
    torch.testing.assert_close(after[1:], packed[1:], atol=1e-6, rtol=1e-6)


def one_sample_per_row(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of the packed row `ids` (1, T) as a right-padded batch: (input_ids, attention_mask),
    each (len(LENGTHS), max(LENGTHS))."""
    rows = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(rows)
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for row, (a, b) in enumerate(itertools.pairwise(starts)):
        rows[row, : b - a], mask[row, : b - a] = ids[0, a:b], 1
    return rows, mask


def test_mtp_loss_of_a_packed_row_equals_that_of_the_padded_batch(tiny_config, randomized):
    """Every token is a target (language modelling): cross-sample MTP targets would change the mean."""
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=2))
    randomized(model)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (1, sum(LENGTHS)))
    with torch.no_grad():
        packed = model(ids, position_ids=packed_positions(LENGTHS), labels=ids).mtp_loss
    rows, mask = one_sample_per_row(ids)
    batch_labels = rows.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = model(rows, attention_mask=mask, labels=batch_labels).mtp_loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_balance_loss_of_a_packed_row_equals_that_of_the_padded_batch(tiny_config, randomized):
    """In training, each packed sample is balanced on its own: the mean over samples, as for one sample a row."""
    model = DeepseekV3ForCausalLM(tiny_config(seq_balance_alpha=0.1))
    randomized(model)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, sum(LENGTHS)))
    with torch.no_grad():
        packed = model.model(ids, position_ids=packed_positions(LENGTHS)).aux_loss
        rows, mask = one_sample_per_row(ids)
        padded = model.model(rows, attention_mask=mask).aux_loss
        whole_row = model.model(ids).aux_loss  # no restart: one sequence of 12 tokens
    torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-5)
    assert not torch.isclose(packed, whole_row)


# ----------------------------------------------------------------------------- shared prefixes

# one row: a 3-token prompt with its first completion (positions 0-4), a second completion continuing the
# prompt (positions 3-5), then a sample of its own (0-1) and two tokens of right padding numbered by cumsum
SHARED_ROW = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 1]])
SHARED_REAL = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])


def test_a_segment_starting_past_zero_continues_the_prefix_of_the_rows_latest_root():
    sequences = PackedSequences.from_positions(SHARED_ROW, SHARED_REAL)
    assert sequences.shares_prefixes
    assert sequences.segment.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4]]
    assert sequences.prefix_length.tolist() == [[0] * 5 + [3] * 3 + [0] * 4]  # padding continues nothing
    assert sequences.prefix_start.tolist() == [[0] * 12]
    assert sequences.memberships().tolist() == [[2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    mask = build_attention_mask(SHARED_REAL, 0, 12, SHARED_ROW)[0, 0]
    assert mask[6].tolist() == [True] * 3 + [False] * 2 + [True] * 2 + [False] * 5  # the prompt, then itself
    assert mask[9].tolist() == [False] * 8 + [True] * 2 + [False] * 2
    # without a root before it, or as padding, a segment starting past 0 is a block of its own
    assert not PackedSequences.from_positions(torch.tensor([[3, 4, 0, 1]])).shares_prefixes
    right_padded = PackedSequences.from_positions(torch.tensor([[0, 1, 2, 2, 2]]), torch.tensor([[1, 1, 1, 0, 0]]))
    assert not right_padded.shares_prefixes


def shared_prefix_model(tiny_config, randomized) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(tiny_config(seq_balance_alpha=0.1))
    randomized(model)
    return model.train()


def test_completions_sharing_a_prompt_see_what_they_see_one_a_row(tiny_config, randomized):
    """Hidden states, balance loss and expert loads of [prompt | a | b] equal those of [prompt a], [prompt b]."""
    model = shared_prefix_model(tiny_config, randomized)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    rows = torch.zeros(3, 6, dtype=torch.long)  # prompt + a, prompt + b, the sample of its own; right padded
    rows[0, :5], rows[1, :3], rows[1, 3:6], rows[2, :2] = ids[0, :5], ids[0, :3], ids[0, 5:8], ids[0, 8:10]
    mask = torch.tensor([[1] * 5 + [0], [1] * 6, [1] * 2 + [0] * 4])
    outputs = {}
    for name, inputs in {"shared": (ids, SHARED_REAL, SHARED_ROW), "padded": (rows, mask, None)}.items():
        twin = copy.deepcopy(model)
        out = twin.model(inputs[0], attention_mask=inputs[1], position_ids=inputs[2])  # with grad: loads recorded
        outputs[name] = out, torch.stack([router.expert_load for router in twin.routers()])
    (shared, shared_load), (padded, padded_load) = outputs["shared"], outputs["padded"]
    hidden, expected = shared.last_hidden_state[0], padded.last_hidden_state
    torch.testing.assert_close(hidden[:5], expected[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[5:8], expected[1, 3:6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[8:10], expected[2, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.aux_loss, padded.aux_loss, atol=1e-7, rtol=1e-5)
    assert torch.equal(shared_load, padded_load) and shared_load.sum() > 0  # the prompt counted twice


def test_the_mtp_loss_refuses_rows_whose_samples_share_a_prefix(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=1))
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    with pytest.raises(ValueError, match="not samples sharing a prefix"):
        model(ids, attention_mask=SHARED_REAL, position_ids=SHARED_ROW, labels=ids)
