import pickle

import pytest
import torch

from r1kit.rollout.token_sets import TokenSets


def random_mask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, vocab, generator=generator) < 0.3
    mask[::3] = True  # some rows keep everything: unrestricted
    mask[:, 0] |= ~mask.any(-1)  # a kept set is never empty
    return mask


def assert_same(a: TokenSets, b: TokenSets) -> None:
    assert torch.equal(a.ids, b.ids) and torch.equal(a.offsets, b.offsets)
    assert a.ids.dtype == torch.int32 and a.offsets.dtype == torch.int64


def test_mask_round_trip_and_unrestricted_rows():
    mask = random_mask(7, 13, seed=0)
    sets = TokenSets.from_mask(mask)
    assert len(sets) == 7
    assert sets.sizes[::3].eq(0).all()  # full rows are stored empty
    assert sets.offsets[0] == 0 and sets.offsets[-1] == sets.ids.numel()
    assert torch.equal(sets.to_mask(13), mask)
    assert TokenSets.unrestricted(4).to_mask(5).all() and len(TokenSets.unrestricted(4)) == 4


def test_slice_select_split_and_cat():
    mask = random_mask(9, 11, seed=1)
    sets = TokenSets.from_mask(mask)
    assert torch.equal(sets.slice(2, 6).to_mask(11), mask[2:6])
    assert len(sets.slice(4, 4)) == 0
    index = torch.tensor([5, 0, 5, 8, 3])
    assert torch.equal(sets.select(index).to_mask(11), mask[index])
    pieces = sets.split([2, 0, 4, 3])
    assert [len(piece) for piece in pieces] == [2, 0, 4, 3]
    assert_same(TokenSets.cat(pieces), sets)
    with pytest.raises(ValueError, match="add up to 8"):
        sets.split([4, 4])


def test_grid_pads_rows_with_unrestricted_positions():
    vocab, width = 10, 5
    masks = [random_mask(length, vocab, seed) for seed, length in enumerate([3, 5, 0, 1])]
    grid = TokenSets.grid([TokenSets.from_mask(mask) for mask in masks], width)
    assert len(grid) == 4 * width
    expected = torch.ones(4, width, vocab, dtype=torch.bool)
    for i, mask in enumerate(masks):
        expected[i, : len(mask)] = mask
    assert torch.equal(grid.to_mask(vocab), expected.view(4 * width, vocab))
    with pytest.raises(ValueError, match="more than the width 2"):
        TokenSets.grid([TokenSets.from_mask(masks[0])], 2)


def test_pickles():
    sets = TokenSets.from_mask(random_mask(4, 6, seed=2))
    assert_same(pickle.loads(pickle.dumps(sets)), sets)
