"""Math accuracy: 1.0 when a completion's final answer equals the reference answer, else 0.0.

    r_i = 1[ canonical(extract(completion_i)) ≡ canonical(reference_i) ]

Extraction and canonicalisation are in `answer_extraction` (\\boxed{} first, then
<answer> tags, "####", "The answer is", "Answer:", the last number). Equivalence:

- two plain numbers ("1234.5", "-3", "3/4") are compared exactly as rationals,
  so 0.5 ≡ 1/2 ≡ .50 and 1,000 ≡ 1000 (separators are gone by then); two
  near-equal ones (closer than 1e-6, not both integers) go to math-verify, which
  rounds floats to 6 decimals (0.3333333 ≡ 1/3, though 9.999999999999999 ≢ 10);
- anything else goes to math-verify (LaTeX and expressions parsed with sympy:
  \\frac{1}{2} ≡ 0.5, 2\\sqrt{2} ≡ \\sqrt{8}, sets, intervals, ...).

The score is None (not applicable) when the reference has no readable answer.

math-verify's own timeouts use SIGALRM, which only works in a process's main
thread; this module turns them off and instead (a) refuses expressions that
could blow up sympy before parsing (deep nesting, towers of powers, huge
exponents or factorials) and (b) relies on the suite's worker processes for a
hard per-completion time limit. Both keep a run from hanging on a hostile
completion; the checks are cheap and the process limit is the backstop.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.protocol import completion_text
from rewards.registry import register
from rewards.rules.answer_extraction import canonical_answer, extract_final_answer, reference_answer

_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_NUMBER_RE = re.compile(r"\d+")
_EXPONENT_RE = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL_RE = re.compile(r"(\d+)\s*!")
MAX_NESTING = 12  # brackets nested deeper than this are not a final answer
MAX_EXPONENT = 10_000  # b^e with e above this is refused (the value would have >10^4 digits)
MAX_FACTORIAL = 1_000
MAX_DIGITS = 300  # longer integer literals are refused before sympy sees them
ROUNDING_GAP = Fraction(1, 10**6)  # numbers this far apart differ after math-verify's 6-decimal rounding


class _DisabledTimeoutWarning(logging.Filter):
    """Drops math-verify's warning that its SIGALRM timeout is off: it is off on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _logger in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger).addFilter(_DisabledTimeoutWarning())


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(0, depth - 1)
    return deepest


def is_safe_to_evaluate(latex: str) -> bool:
    """False for expressions whose sympy evaluation could take unbounded time or memory.

    >>> is_safe_to_evaluate(r"2^{10}"), is_safe_to_evaluate(r"9^{9^{9^{9}}}"), is_safe_to_evaluate("3000!")
    (True, False, False)
    """
    if _nesting_depth(latex) > MAX_NESTING or latex.count("^") > 4:
        return False
    if any(len(digits) > MAX_DIGITS for digits in _NUMBER_RE.findall(latex)):
        return False
    for power in re.finditer(r"\^", latex):
        exponent = latex[power.end() :].lstrip()
        if exponent.startswith("{") and "^" in exponent[: exponent.find("}") + 1 or None]:
            return False  # a tower of powers
    if any(int(e) > MAX_EXPONENT for e in _EXPONENT_RE.findall(latex)):
        return False
    return all(int(n) <= MAX_FACTORIAL for n in _FACTORIAL_RE.findall(latex))


def _parse_latex(answer: str) -> list[Any]:
    return parse(
        f"${answer}$",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two canonical answers (see `canonical_answer`) denote the same value.

    >>> answers_equal("0.5", "1/2"), answers_equal(r"\\frac{1}{2}", "0.5"), answers_equal("18", "19")
    (True, True, False)
    """
    if predicted == reference:
        return True
    if _PLAIN_NUMBER_RE.fullmatch(predicted) and _PLAIN_NUMBER_RE.fullmatch(reference):
        try:
            a, b = Fraction(predicted), Fraction(reference)
        except (ValueError, ZeroDivisionError):
            return False
        if a == b or (a.denominator == 1 and b.denominator == 1) or abs(a - b) >= ROUNDING_GAP:
            return a == b  # decided without sympy: only near-equal non-integers go on to rounding
    if not (is_safe_to_evaluate(predicted) and is_safe_to_evaluate(reference)):
        return False
    gold, target = _parse_latex(reference), _parse_latex(predicted)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


def score_answer(completion: str, reference: Any) -> float | None:
    """1.0 / 0.0 for one completion against one reference; None when the reference has no answer."""
    gold = None if reference is None else reference_answer(str(reference))
    if gold is None:
        return None
    span = extract_final_answer(completion)
    predicted = None if span is None else canonical_answer(span)
    return float(predicted is not None and answers_equal(predicted, gold))


@dataclass(frozen=True)
class MathAccuracy:
    """Math accuracy against the reference in column `answer_column` (GSM8K's "answer" by default).

    A reference is a bare value ("38", "\\frac{3}{4}") or a worked solution ending in "#### N".

    >>> MathAccuracy()(["<think> 19 * 2 = 38 </think> <answer> 38 </answer>", "The answer is 39."],
    ...                answer=["38", "#### 38"])
    [1.0, 0.0]
    """

    answer_column: str = "answer"
    __name__ = "math_accuracy"  # the name in metrics (instances have no __name__ of their own)

    def __post_init__(self) -> None:
        if not self.answer_column:
            raise ValueError("MathAccuracy.answer_column must be a non-empty column name")

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        if self.answer_column not in columns:
            raise KeyError(
                f"math_accuracy needs the reference-answer column {self.answer_column!r}; "
                f"got columns {sorted(k for k in columns if k != 'prompts')}"
            )
        references = columns[self.answer_column]
        return [score_answer(completion_text(c), ref) for c, ref in zip(completions, references, strict=True)]


math_accuracy = register("math_accuracy")(MathAccuracy())
