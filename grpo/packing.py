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

Shared prompts: a GRPO micro-batch holds each prompt G times. Sequences with
the same prompt can form one unit, the prompt once and then every completion,
each completion's positions continuing from the prompt's:

    unit:  [prompt: 0 .. p - 1 | completion 1: p .. | completion 2: p .. | ...]

Our DeepSeek-V3 reads such a row as sequences that share a prefix
(`policy.attention.PackedSequences`): each completion attends the prompt and
itself, so the prompt is computed once for all of them and every hidden state
is the padded layout's. Units, not sequences, are then packed into rows.

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
from collections.abc import Callable, Sequence
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


SHARED_UNIT_TOKENS = 1024
"""Most tokens of a shared prompt with its completions in one unit (`plan_packing`). Longer units save
little more (one prompt per extra completion) and cost attention, quadratic in the row length; on the
benchmark's arithmetic groups (22 + 8 x 4..48 tokens) whole groups trained as fast as groups cut at 192
or 256 tokens and faster than at 128 (docs/benchmarks.md)."""


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
    capacity: int | Callable[[list[int]], int] | None = None,
    device: torch.device | str | None = None,
    prompt_groups: Sequence[Sequence[int]] | None = None,
    unit_limit: int | None = None,
) -> PackingPlan:
    """Best-fit-decreasing rows of whole sequences, for a padded batch of n sequences.

    prompt_lengths (n), each >= 1: real prompt tokens, the last p_i of the P =
    `prompt_width` prompt columns (left padding); completion_lengths (n): real
    completion tokens, the first c_i of the T = `completion_width` completion
    columns (right padding). capacity: tokens per row, at least the longest
    unit (below), or a function choosing it from the units' lengths (default:
    `row_capacity`). Index tensors are built on `device`.

    prompt_groups: sequences whose prompts are the same tokens, each sequence in
    at most one group. A group's sequences share their prompt: a unit holds it
    once, then each completion, positions continuing from the prompt's
    (`policy.attention.PackedSequences`), and the first completion token of each
    is scored from the prompt's last token. A group is cut into units of at most
    `unit_limit` tokens (default `SHARED_UNIT_TOKENS`), in order, each at least
    one sequence; a sequence without completion tokens stays a unit of its own.
    Without groups every sequence is a unit of its own.

    >>> plan = plan_packing([2, 1], [1, 2], prompt_width=2, completion_width=2, capacity=6)
    >>> plan.position_ids.tolist(), plan.padded_index.tolist(), plan.packed_index.tolist()
    ([[0, 1, 2, 0, 1, 2]], [0, 1, 2, 5, 6, 7], [0, 1, 2, 3, 4, 5])
    >>> shared = plan_packing([2, 2], [1, 2], 2, 2, capacity=5, prompt_groups=[[0, 1]])
    >>> shared.position_ids.tolist(), shared.score_index.tolist()
    ([[0, 1, 2, 2, 3]], [1, 1, 3])
    """
    n = len(prompt_lengths)
    if len(completion_lengths) != n or n == 0:
        raise ValueError(f"need n >= 1 prompt and completion lengths, got {n} and {len(completion_lengths)}")
    if min(prompt_lengths) < 1 or max(prompt_lengths) > prompt_width:
        raise ValueError(f"prompt lengths must lie in 1..{prompt_width}, got {list(prompt_lengths)}")
    if min(completion_lengths) < 0 or max(completion_lengths) > completion_width:
        raise ValueError(f"completion lengths must lie in 0..{completion_width}, got {list(completion_lengths)}")
    lengths = [p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
    unit_limit = SHARED_UNIT_TOKENS if unit_limit is None else unit_limit
    units = _shared_prompt_units(prompt_groups or [], prompt_lengths, completion_lengths, unit_limit)
    # a unit's first sequence brings the prompt; the others only their completions
    skip = [0] * n  # leading prompt tokens of each sequence not placed
    for unit in units:
        for sequence in unit[1:]:
            skip[sequence] = prompt_lengths[sequence]
    pieces = [lengths[i] - skip[i] for i in range(n)]  # tokens each sequence places
    unit_lengths = [sum(pieces[i] for i in unit) for unit in units]
    capacity = row_capacity if capacity is None else capacity
    capacity = capacity(unit_lengths) if callable(capacity) else capacity
    if capacity < max(unit_lengths):
        raise ValueError(
            f"capacity {capacity} is shorter than the longest sequence or shared prompt with its completions "
            f"({max(unit_lengths)} tokens)"
        )
    rows = best_fit_decreasing(unit_lengths, capacity)
    row_of, offset_of, unit_start = [0] * n, [0] * n, [0] * n
    fill = []  # tokens in each row
    for r, members in enumerate(rows):
        offset = 0
        for unit in members:
            start = offset
            for sequence in units[unit]:
                row_of[sequence], offset_of[sequence], unit_start[sequence] = r, offset, start
                offset += pieces[sequence]
        fill.append(offset)

    piece = _long(pieces, device)
    prompt, skipped = _long(prompt_lengths, device), _long(skip, device)
    total = sum(pieces)
    sequence = torch.repeat_interleave(torch.arange(n, device=device), piece, output_size=total)  # (M,)
    placed = torch.arange(total, device=device) - (piece.cumsum(0) - piece)[sequence]  # index within its piece
    local = skipped[sequence] + placed  # position in its sequence
    row_start = _long(row_of, device)[sequence] * capacity
    packed_index = row_start + _long(offset_of, device)[sequence] + placed
    width = prompt_width + completion_width
    padded_index = sequence * width + (prompt_width - prompt[sequence]) + local
    # the padding after a row's last unit counts 0, 1, ...; real tokens get their own positions
    position_ids = torch.arange(capacity, device=device) - _long(fill, device)[:, None]  # (R, capacity)
    position_ids.view(-1)[packed_index] = local
    attention_mask = torch.zeros(len(rows) * capacity, dtype=torch.long, device=device)
    attention_mask[packed_index] = 1
    completion = local >= prompt[sequence]  # (M,)
    # a completion token is scored from the token before it in its sequence: the shared prompt's last one
    # for the first token of a completion placed after the prompt's first completion
    last_prompt_token = row_start + _long(unit_start, device)[sequence] + prompt[sequence] - 1
    score_index = torch.where(placed == 0, last_prompt_token, packed_index - 1)
    return PackingPlan(
        padded_index=padded_index,
        packed_index=packed_index,
        position_ids=position_ids,
        attention_mask=attention_mask.view(len(rows), capacity),
        score_index=score_index[completion],
        completion_index=sequence[completion] * completion_width + (local - prompt[sequence])[completion],
        grid=(n, completion_width),
    )


def same_prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor, prompt_routes: Tensor | None = None) -> list[list[int]]:
    """Groups (of two or more, in batch order) of the sequences whose real prompt tokens are the same.

    prompt_ids, prompt_mask: (n, P), the mask 0 on padding. prompt_routes (n, P, ...):
    the experts the sampler routed each prompt token to (keep routing); sequences
    whose prompts were routed differently are not grouped, so replaying the
    group's one copy of the prompt replays every sequence's own routes.

    >>> ids = torch.tensor([[0, 5, 6], [5, 5, 6], [0, 5, 6]])
    >>> same_prompt_groups(ids, torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]]))
    [[0, 2]]
    """
    by_prompt: dict[tuple[int, ...], list[list[int]]] = defaultdict(list)
    for sequence, (ids, real) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)):
        key = tuple(token for token, keep in zip(ids, real, strict=True) if keep)
        groups = by_prompt[key]
        routed_alike = (
            g for g in groups if prompt_routes is None or prompt_routes[g[0]].equal(prompt_routes[sequence])
        )
        same = next(routed_alike, None)
        if same is None:
            groups.append([sequence])
        else:
            same.append(sequence)
    return [group for groups in by_prompt.values() for group in groups if len(group) > 1]


def _shared_prompt_units(
    groups: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    unit_limit: int,
) -> list[list[int]]:
    """The units of `plan_packing`: each group's sequences with completion tokens cut, in order, into runs
    whose prompt plus completions hold at most `unit_limit` tokens; every other sequence alone."""
    units: list[list[int]] = []
    grouped = [False] * len(prompt_lengths)
    for group in groups:
        if len({prompt_lengths[sequence] for sequence in group}) > 1:
            raise ValueError(f"prompt group {list(group)} holds prompts of different lengths; a group shares one")
        unit: list[int] = []
        size = 0
        for sequence in group:
            if grouped[sequence]:
                raise ValueError(f"sequence {sequence} is in more than one prompt group")
            grouped[sequence] = True
            if completion_lengths[sequence] == 0:
                units.append([sequence])
                continue
            extra = completion_lengths[sequence] + (0 if unit else prompt_lengths[sequence])
            if unit and size + extra > unit_limit:
                units.append(unit)
                unit, size, extra = [], 0, prompt_lengths[sequence] + completion_lengths[sequence]
            unit.append(sequence)
            size += extra
        if unit:
            units.append(unit)
    units.extend([sequence] for sequence in range(len(prompt_lengths)) if not grouped[sequence])
    return units


def _long(values: Sequence[int], device: torch.device | str | None) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
