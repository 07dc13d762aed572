"""Stop strings: which rows of a decode batch have just completed one of them.

A row stops at the first step whose newest tokens complete a stop string. Only
the tail of each row is decoded: a character takes at most 4 bytes, so at most
4 byte-level tokens, and a string of c characters lies within the last 4c
tokens. Text is decoded as completions are (special tokens skipped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class StopStrings:
    """Matches `stop_strings` against the newest tokens of each row."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        if not stop_strings:
            raise ValueError("StopStrings needs at least one string")
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.window = 4 * max(len(s) for s in self.stop_strings)

    def completed(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """tokens: (rows, steps) ids sampled so far; lengths (rows,): how many of each row's steps are
        sampled (default all). Returns (rows,) bool on tokens' device: whose text now contains a stop
        string (a row that held one before has already stopped)."""
        if lengths is None:
            lengths = torch.full((len(tokens),), tokens.shape[1])
        ends = lengths.tolist()
        tails = [row[max(0, end - self.window) : end] for row, end in zip(tokens.tolist(), ends, strict=True)]
        tails = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hits = [any(stop in text for stop in self.stop_strings) for text in tails]
        return torch.tensor(hits, dtype=torch.bool, device=tokens.device)
