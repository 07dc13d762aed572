"""Padding-free micro-batches: whole sequences packed back to back into rows, positions restarting.

A GRPO micro-batch of n sequences is laid out for the policy as
`[left-padded prompt (P) | right-padded completion (T)]` (grpo/batch.py):
n * (P + T) token slots, of which only sum_i (p_i + c_i) hold tokens. A
`PackingPlan` places each sequence's real tokens (its prompt, then its
completion) back to back in rows of `capacity` tokens, and says where every
token comes from and goes to, so that whatever is laid out per token (ids,
replayed experts, loss masks) follows the packing exactly:

    row r:  [seq a: p_a + c_a tokens | seq b: p_b + c_b tokens | ... | padding]
    positions 0 .. p_a + c_a - 1, then 0 .. again for b, ..., then 0 .. for the padding

Positions restarting at 0 mark the sequence boundaries; the policy attends
only within a sequence (a block-diagonal causal mask, policy/attention.py, and
transformers' `find_packed_sequence_indices`) and gives every token the
position it has in the padded layout, so its hidden state is the same.

Rows (`best_fit_decreasing`, lengths in tokens): take the sequences longest
first (ties in their original order) and put each into the open row with the
least free space that still holds it, opening a new row when none does. A
sequence longer than the row counts as `row_length` tokens (SFT cuts it; the
GRPO plan makes its rows as long as its longest sequence). sft/packing.py packs
SFT samples with the same function.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def best_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of sample indices: every sample in exactly one row, at most `row_length` tokens per row.

    lengths: tokens per sample (>= 1); a longer one than `row_length` counts as
    `row_length` (it will be cut). Rows come in the order they were opened, their
    samples in the order placed. O(n log n) for n samples.

    >>> best_fit_decreasing([3, 6, 2, 5, 4], 8)
    [[1, 2], [3, 0], [4]]
    """
    if row_length < 1:
        raise ValueError(f"row_length must be at least 1, got {row_length}")
    sizes = [min(length, row_length) for length in lengths]
    if sizes and min(sizes) < 1:
        raise ValueError(f"sample {sizes.index(min(sizes))} has no tokens; every sample needs at least one")
    rows: list[list[int]] = []
    rows_with_space: dict[int, deque[int]] = defaultdict(deque)  # free tokens -> rows with that much free
    free_sizes: list[int] = []  # sorted free sizes that some open row has
    for sample in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[sample]
        slot = bisect_left(free_sizes, size)  # the tightest free size that still fits
        if slot == len(free_sizes):
            row, free = len(rows), row_length
            rows.append([])
        else:
            free = free_sizes[slot]
            row = rows_with_space[free].popleft()
            if not rows_with_space[free]:
                del free_sizes[slot], rows_with_space[free]
        rows[row].append(sample)
        free -= size
        if free > 0:
            if free not in rows_with_space:
                insort(free_sizes, free)
            rows_with_space[free].append(row)
    return rows


def row_capacity(lengths: Sequence[int], steps: int = 8) -> int:
    """Tokens per packed row for sequences of `lengths`: the capacity, among L, L + L/steps, ..., 2L
    (L the longest sequence), whose best-fit rows hold the fewest token slots (rows x capacity);
    the shortest of those on a tie.

    The linear layers' work grows with the slots; a row's attention (a dense masked
    SDPA) with its length squared, so no row is longer than 2L. Rows of exactly L
    leave much of their space empty when most sequences are over L / 2 long (on
    the benchmark's arithmetic batches they remove half the padding that rows
    chosen this way do, and run slower; docs/benchmarks.md).

    >>> row_capacity([80, 60, 40, 20])  # rows 80 + 20 and 60 + 40: 200 slots, against 3 rows of 80
    100
    """
    longest = max(lengths)
    candidates = [longest + longest * step // steps for step in range(steps + 1)]
    return min(candidates, key=lambda capacity: (len(best_fit_decreasing(lengths, capacity)) * capacity, capacity))


@dataclass
class PackingPlan:
    """Where the M real tokens of n padded sequences go in R packed rows of `capacity` tokens.

    padded_index (M,): flat index of each real token in the padded (n, P + T) layout.
    packed_index (M,): flat index of the same token in the packed (R, capacity) layout.
    position_ids (R, capacity): each token's position in its sequence; the padding
        at the end of a row counts 0, 1, ... as a sequence of its own.
    attention_mask (R, capacity): 1 on real tokens, 0 on that padding.
    score_index (S,): flat packed index of the hidden state that predicts each of
        the S real completion tokens (the token just before it).
    completion_index (S,): flat index of that completion token in the (n, T) grid.
    grid: (n, T), the completion grid's shape.
    """

    padded_index: Tensor
    packed_index: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    score_index: Tensor
    completion_index: Tensor
    grid: tuple[int, int]

    @property
    def rows(self) -> int:
        return self.position_ids.shape[0]

    @property
    def capacity(self) -> int:
        return self.position_ids.shape[1]

    def pack(self, values: Tensor, fill: int | float | bool) -> Tensor:
        """values (n, P + T, *rest) in the padded layout -> (R, capacity, *rest), `fill` on the padding."""
        rest = values.shape[2:]
        packed = values.new_full((self.rows * self.capacity, *rest), fill)
        packed[self.packed_index] = values.flatten(0, 1)[self.padded_index]
        return packed.view(self.rows, self.capacity, *rest)

    def unpack_completions(self, values: Tensor) -> Tensor:
        """values (S,) of the real completion tokens -> (n, T) completion grid, zeros elsewhere (differentiable)."""
        n, t = self.grid
        return values.new_zeros(n * t).index_put((self.completion_index,), values).view(n, t)


def plan_packing(
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    prompt_width: int,
    completion_width: int,
    capacity: int | None = None,
    device: torch.device | str | None = None,
) -> PackingPlan:
    """Best-fit-decreasing rows of whole sequences, for a padded batch of n sequences.

    prompt_lengths (n), each >= 1: real prompt tokens, the last p_i of the P =
    `prompt_width` prompt columns (left padding); completion_lengths (n): real
    completion tokens, the first c_i of the T = `completion_width` completion
    columns (right padding). capacity: tokens per row, at least the longest
    sequence (default: `row_capacity`). Index tensors are built on `device`.

    >>> plan = plan_packing([2, 1], [1, 2], prompt_width=2, completion_width=2, capacity=6)
    >>> plan.position_ids.tolist(), plan.padded_index.tolist(), plan.packed_index.tolist()
    ([[0, 1, 2, 0, 1, 2]], [0, 1, 2, 5, 6, 7], [0, 1, 2, 3, 4, 5])
    """
    n = len(prompt_lengths)
    if len(completion_lengths) != n or n == 0:
        raise ValueError(f"need n >= 1 prompt and completion lengths, got {n} and {len(completion_lengths)}")
    if min(prompt_lengths) < 1 or max(prompt_lengths) > prompt_width:
        raise ValueError(f"prompt lengths must lie in 1..{prompt_width}, got {list(prompt_lengths)}")
    if min(completion_lengths) < 0 or max(completion_lengths) > completion_width:
        raise ValueError(f"completion lengths must lie in 0..{completion_width}, got {list(completion_lengths)}")
    lengths = [p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
    capacity = row_capacity(lengths) if capacity is None else capacity
    if capacity < max(lengths):
        raise ValueError(f"capacity {capacity} is shorter than the longest sequence ({max(lengths)} tokens)")
    rows = best_fit_decreasing(lengths, capacity)
    row_of = [0] * n
    offset_of = [0] * n
    fill = []  # tokens in each row
    for r, members in enumerate(rows):
        offset = 0
        for sequence in members:
            row_of[sequence] = r
            offset_of[sequence] = offset
            offset += lengths[sequence]
        fill.append(offset)

    length = _long(lengths, device)
    prompt = _long(prompt_lengths, device)
    total = sum(lengths)
    sequence = torch.repeat_interleave(torch.arange(n, device=device), length, output_size=total)  # (M,)
    local = torch.arange(total, device=device) - (length.cumsum(0) - length)[sequence]  # position in its sequence
    packed_index = _long(row_of, device)[sequence] * capacity + _long(offset_of, device)[sequence] + local
    width = prompt_width + completion_width
    padded_index = sequence * width + (prompt_width - prompt[sequence]) + local
    # the padding after a row's last sequence counts 0, 1, ...; real tokens get their own positions
    position_ids = torch.arange(capacity, device=device) - _long(fill, device)[:, None]  # (R, capacity)
    position_ids.view(-1)[packed_index] = local
    attention_mask = torch.zeros(len(rows) * capacity, dtype=torch.long, device=device)
    attention_mask[packed_index] = 1
    completion = local >= prompt[sequence]  # (M,)
    return PackingPlan(
        padded_index=padded_index,
        packed_index=packed_index,
        position_ids=position_ids,
        attention_mask=attention_mask.view(len(rows), capacity),
        score_index=packed_index[completion] - 1,
        completion_index=sequence[completion] * completion_width + (local - prompt[sequence])[completion],
        grid=(n, completion_width),
    )


def _long(values: Sequence[int], device: torch.device | str | None) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
