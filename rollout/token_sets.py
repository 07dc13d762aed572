"""Variable-size sets of token ids, one per row, in CSR form.

A sampler that truncates its distribution (top-k, top-p, min-p) draws each
token from a kept set of the vocabulary; the trainer needs that set to score
the token under the same renormalised distribution. `TokenSets` stores the
kept set of R positions as one flat id tensor and R + 1 offsets: row r holds
`ids[offsets[r] : offsets[r + 1]]`. An empty row means "unrestricted" (the
whole vocabulary): a kept set is never empty, and a set that keeps every token
is stored empty, so positions without truncation cost nothing.

    >>> sets = TokenSets.from_mask(torch.tensor([[True, False, True], [True, True, True]]))
    >>> sets.ids.tolist(), sets.offsets.tolist()
    ([0, 2], [0, 2, 2])
    >>> sets.to_mask(3).tolist()
    [[True, False, True], [True, True, True]]

The engine returns one `TokenSets` per completion (a row per token);
`TokenSets.grid` lays them out over the trainer's (N, T) right-padded grid.
A dataclass of tensors, it pickles across process boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
from torch import Tensor


@dataclass(eq=False)
class TokenSets:
    """R sets of token ids: row r is `ids[offsets[r] : offsets[r + 1]]`, empty = unrestricted.

    ids: (total,) int32 token ids, row by row, ascending within a row.
    offsets: (R + 1,) int64, offsets[0] == 0 and offsets[-1] == total.
    """

    ids: Tensor
    offsets: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 1 or self.offsets.dim() != 1 or self.offsets.numel() < 1:
            shapes = f"{tuple(self.ids.shape)} and {tuple(self.offsets.shape)}"
            raise ValueError(f"TokenSets needs 1-d ids and non-empty 1-d offsets, got {shapes}")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def sizes(self) -> Tensor:
        """(R,) int64 number of ids per row (0 = unrestricted)."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def unrestricted(cls, num_rows: int, device: torch.device | str | None = None) -> TokenSets:
        """`num_rows` unrestricted rows."""
        return cls(
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(num_rows + 1, dtype=torch.int64, device=device),
        )

    @classmethod
    def from_mask(cls, mask: Tensor) -> TokenSets:
        """The sets of a (R, V) bool mask of kept tokens; rows keeping all V tokens become unrestricted."""
        mask = mask & ~mask.all(dim=-1, keepdim=True)  # (R, V)
        sizes = mask.sum(dim=-1)  # (R,)
        ids = mask.nonzero()[:, 1].to(torch.int32)  # row-major: row by row, ascending ids
        return cls(ids, torch.nn.functional.pad(sizes.cumsum(0), (1, 0)))

    def to_mask(self, vocab_size: int, device: torch.device | str | None = None) -> Tensor:
        """(R, vocab_size) bool mask of kept tokens on `device`; unrestricted rows are all True."""
        device = self.ids.device if device is None else device
        sizes = self.sizes.to(device)
        rows = torch.repeat_interleave(torch.arange(len(self), device=device), sizes)  # (total,)
        mask = torch.zeros(len(self), vocab_size, dtype=torch.bool, device=device)
        mask[rows, self.ids.to(device, torch.long)] = True
        return mask | (sizes == 0).unsqueeze(-1)

    def to(self, device: torch.device | str) -> TokenSets:
        """The same sets with their tensors on `device`."""
        return TokenSets(self.ids.to(device), self.offsets.to(device))

    def slice(self, start: int, end: int) -> TokenSets:
        """Rows [start, end)."""
        offsets = self.offsets[start : end + 1]
        return TokenSets(self.ids[int(offsets[0]) : int(offsets[-1])], offsets - offsets[0])

    def select(self, rows: Tensor) -> TokenSets:
        """The rows at `rows` (K,) int64 indices, in that order (repeats allowed)."""
        rows = rows.to(self.offsets.device, torch.long)
        sizes = self.sizes[rows]  # (K,)
        offsets = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))  # (K + 1,)
        shift = torch.repeat_interleave(self.offsets[rows] - offsets[:-1], sizes)  # (total,)
        return TokenSets(self.ids[torch.arange(int(offsets[-1]), device=shift.device) + shift], offsets)

    def split(self, sizes: Sequence[int]) -> list[TokenSets]:
        """Consecutive pieces of `sizes[i]` rows each; the sizes must add up to len(self)."""
        if sum(sizes) != len(self):
            raise ValueError(f"split sizes add up to {sum(sizes)}, expected {len(self)} rows")
        bounds = [0, *accumulate(sizes)]
        return [self.slice(start, end) for start, end in pairwise(bounds)]

    @staticmethod
    def cat(pieces: Sequence[TokenSets]) -> TokenSets:
        """The rows of `pieces`, one after the other."""
        if not pieces:
            raise ValueError("TokenSets.cat needs at least one piece")
        sizes = torch.cat([piece.sizes for piece in pieces])
        offsets = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))
        return TokenSets(torch.cat([piece.ids for piece in pieces]), offsets)

    @staticmethod
    def grid(rows: Sequence[TokenSets], width: int) -> TokenSets:
        """The sets of an (N, width) right-padded grid, flattened row-major to N * width rows.

        rows: N pieces, piece i holding the sets of the first len(rows[i]) <= width
        positions of grid row i; padding positions are unrestricted. The result is on the CPU.
        """
        too_long = [len(row) for row in rows if len(row) > width]
        if too_long:
            raise ValueError(f"a grid row has {too_long[0]} positions, more than the width {width}")
        if not rows:
            return TokenSets.unrestricted(0)
        sizes = torch.zeros(len(rows), width, dtype=torch.int64)  # (N, width)
        for i, row in enumerate(rows):
            sizes[i, : len(row)] = row.sizes.cpu()
        offsets = torch.nn.functional.pad(sizes.flatten().cumsum(0), (1, 0))
        return TokenSets(torch.cat([row.ids.cpu() for row in rows]), offsets)
