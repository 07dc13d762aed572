"""The hand-labelled competition-math answer set: (gold, completion, label) triples.

Each line of data/competition_answers.jsonl holds a reference answer as MATH or
NuminaMath store it (bare LaTeX, $...$, or a worked solution ending in \\boxed{}),
a model-style completion, whether a careful grader marks the completion's final
answer equal to the reference, the answer's form (interval, matrix, text, ...)
and the reason for the label. Negatives are near misses: swapped pairs, open
against closed endpoints, a missing root, a hedge between candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PATH = Path(__file__).parent / "data" / "competition_answers.jsonl"


@dataclass(frozen=True)
class LabelledAnswer:
    gold: str
    completion: str
    label: bool
    form: str
    why: str


def labelled_answers(path: Path = PATH) -> list[LabelledAnswer]:
    with open(path, encoding="utf-8") as file:
        return [LabelledAnswer(**json.loads(line)) for line in file if line.strip()]
