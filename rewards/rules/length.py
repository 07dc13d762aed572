"""Overlong penalty: DAPO's soft punishment for completions near or over the length cap.

With L = completion length, L_max = `max_length` and L_cache = `cache_length`
(DAPO, Yu et al. 2025, eq. 13):

    r = 0                                   if L <= L_max - L_cache
    r = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
    r = -1                                  if L > L_max

so the penalty ramps linearly from 0 to -1 across the last L_cache tokens.
Rewards here are <= 0; add this to an accuracy reward with a weight.

Length is counted in tokens from the `completion_ids` column (which TRL passes to
reward functions and r1kit's trainer puts in the suite's columns), or in
characters with `unit="characters"`. The registered `length_penalty` uses
DAPO's numbers: L_max = 20480, L_cache = 4096 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from r1kit.rewards.protocol import completion_text
from r1kit.rewards.registry import register


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong penalty for one completion of `length` units, in [-1, 0].

    >>> overlong_penalty(10, 100, 20), overlong_penalty(90, 100, 20), overlong_penalty(101, 100, 20)
    (0.0, -0.5, -1.0)
    """
    threshold = max_length - cache_length
    if length <= threshold:
        return 0.0
    if length <= max_length:
        return (threshold - length) / cache_length
    return -1.0


@dataclass(frozen=True)
class OverlongPenalty:
    """DAPO overlong penalty; lengths in tokens (from `length_column`) or in characters.

    >>> OverlongPenalty(max_length=100, cache_length=20)(["a", "b"], completion_ids=[[0] * 10, [0] * 90])
    [0.0, -0.5]
    """

    max_length: int = 20480
    cache_length: int = 4096
    unit: Literal["tokens", "characters"] = "tokens"
    length_column: str = "completion_ids"
    __name__ = "length_penalty"
    elementwise = True  # scores each completion on its own: the suite may run one per task

    def __post_init__(self) -> None:
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(
                "OverlongPenalty needs 0 < cache_length <= max_length, "
                f"got cache_length={self.cache_length}, max_length={self.max_length}"
            )
        if self.unit not in ("tokens", "characters"):
            raise ValueError(f"OverlongPenalty.unit must be 'tokens' or 'characters', got {self.unit!r}")

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        if self.unit == "characters":
            lengths = [len(completion_text(c)) for c in completions]
        elif self.length_column in columns:
            lengths = [len(ids) for ids in columns[self.length_column]]
        else:
            raise KeyError(
                f"length_penalty counts tokens from the {self.length_column!r} column, which is missing; "
                "pass token ids there or use OverlongPenalty(unit='characters')"
            )
        return [overlong_penalty(length, self.max_length, self.cache_length) for length in lengths]


length_penalty = register("length_penalty")(OverlongPenalty())
