"""Math accuracy: 1.0 when a completion's final answer equals the reference answer, else 0.0.

    r_i = 1[ canonical(extract(completion_i)) ≡ canonical(reference_i) ]

Three steps, one module each:

- `answer_extraction` finds the final answer: \\boxed{} (several adjacent boxes
  form one answer), then <answer> tags, "####", "The answer is", "Answer:", and
  last the final formula or number;
- `answer_forms` canonicalises it: plain numbers and percentages, or cleaned LaTeX;
- `math_equivalence` decides ≡: exact rationals for plain numbers, letters for
  multiple choice, words for text answers, and math-verify with sympy for the rest
  (expressions, equations, sets, tuples, intervals and inequalities, matrices).

The score is None (not applicable) when the reference has no readable answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1kit.rewards.protocol import completion_text
from r1kit.rewards.registry import register
from r1kit.rewards.rules.answer_extraction import extract_final_answer, reference_span
from r1kit.rewards.rules.answer_forms import canonical_answer
from r1kit.rewards.rules.math_equivalence import DEFAULT_OPTIONS, EquivalenceOptions, answers_equal


def score_answer(completion: str, reference: Any, options: EquivalenceOptions = DEFAULT_OPTIONS) -> float | None:
    """1.0 / 0.0 for one completion against one reference; None when the reference has no answer."""
    gold = None if reference is None else canonical_answer(reference_span(str(reference)))
    if gold is None:
        return None
    span = extract_final_answer(completion)
    predicted = None if span is None else canonical_answer(span)
    return float(predicted is not None and answers_equal(predicted, gold, options))


@dataclass(frozen=True)
class MathAccuracy:
    """Math accuracy against the reference in column `answer_column` (GSM8K's "answer" by default).

    A reference is a bare value ("38", "$\\frac{3}{4}$", "(3,2)") or a worked solution
    ending in "#### N" or in \\boxed{}. The other fields set how strict equivalence is
    (see `EquivalenceOptions`): `float_rounding` decimals (6), sympy's
    `numeric_precision` (15 digits), `relations_as_sets` (x > 2 ≡ (2, ∞); on) and
    `strict_variables` (x + 1 ≢ y + 1; on).

    >>> MathAccuracy()(["<think> 19 * 2 = 38 </think> <answer> 38 </answer>", "The answer is 39."],
    ...                answer=["38", "#### 38"])
    [1.0, 0.0]
    """

    answer_column: str = "answer"
    float_rounding: int = 6
    numeric_precision: int = 15
    relations_as_sets: bool = True
    strict_variables: bool = True
    __name__ = "math_accuracy"  # the name in metrics (instances have no __name__ of their own)
    elementwise = True  # scores each completion on its own: the suite may run one per task

    def __post_init__(self) -> None:
        if not self.answer_column:
            raise ValueError("MathAccuracy.answer_column must be a non-empty column name")
        self.options  # validates the equivalence options  # noqa: B018

    @property
    def options(self) -> EquivalenceOptions:
        return EquivalenceOptions(
            float_rounding=self.float_rounding,
            numeric_precision=self.numeric_precision,
            relations_as_sets=self.relations_as_sets,
            strict_variables=self.strict_variables,
        )

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        if self.answer_column not in columns:
            raise KeyError(
                f"math_accuracy needs the reference-answer column {self.answer_column!r}; "
                f"got columns {sorted(k for k in columns if k != 'prompts')}"
            )
        references, options = columns[self.answer_column], self.options
        return [score_answer(completion_text(c), ref, options) for c, ref in zip(completions, references, strict=True)]


math_accuracy = register("math_accuracy")(MathAccuracy())
