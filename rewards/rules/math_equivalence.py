"""Whether two canonical answers (see `answer_forms.canonical_answer`) denote the same thing.

In order, the first that applies decides:

1. equal strings;
2. two plain numbers: equal as rationals (0.5 ≡ 1/2 ≡ .50), or equal after rounding
   to `float_rounding` decimals when one of them is written with at least that
   many (0.333333 ≡ 1/3, 0.33 ≢ 1/3). A percentage is its number or its value
   over 100: 25% ≡ 25 (GSM8K's convention) and 25% ≡ 0.25;
3. a multiple-choice reference ("(C)", "(C) 12") against the prediction's letter
   ("C", "(C) 12") or the value that follows the reference's letter ("12");
4. words ("\\text{odd}" ≡ "Odd"), compared case-insensitively; a yes/no reference
   against the prediction's first word ("No, it cannot be done" ≡ "no");
5. everything else: math-verify parses both as LaTeX and compares them with
   sympy: expressions (2\\sqrt{2} ≡ \\sqrt{8}), equations (x = 5 ≡ 5, (p,q)=(3,2) ≡
   (3,2)), unordered lists and sets ({1,2} ≡ 2, 1), ordered tuples, intervals and
   unions, matrices and complex numbers. A list of relations in one variable is
   the union of their solution sets ("x < -1 or x > 2" ≡ (-∞,-1) ∪ (2,∞)), and with
   `relations_as_sets` an inequality equals the set it describes (|x| < 2 ≡ (-2, 2)).

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
from functools import lru_cache
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify
from sympy import FiniteSet, Or, Rel

from r1kit.rewards.rules.answer_forms import choice, choice_value, first_word, words

_PLAIN_NUMBER_RE = re.compile(r"(?P<number>-?(?:\d+(?:\.(?P<decimals>\d*))?|\.(?P<only_decimals>\d+))(?:/\d+)?)%?")
_NUMBER_RE = re.compile(r"\d+")
_EXPONENT_RE = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL_RE = re.compile(r"(\d+)\s*!")
MAX_NESTING = 12  # brackets nested deeper than this are not a final answer
MAX_EXPONENT = 10_000  # b^e with e above this is refused (the value would have >10^4 digits)
MAX_FACTORIAL = 1_000
MAX_DIGITS = 300  # longer integer literals are refused before sympy sees them


@dataclass(frozen=True)
class EquivalenceOptions:
    """How strict `answers_equal` is.

    float_rounding: decimals to which a number written with at least as many is
        rounded before comparing (0.333333 ≡ 1/3 at 6).
    numeric_precision: significant digits sympy evaluates expressions to.
    relations_as_sets: a predicted inequality or equation in one variable equals
        the set of its solutions (x > 2 ≡ (2, ∞)); without it a predicted relation
        only equals a relation (a reference relation still equals a predicted set).
    strict_variables: variable names matter (x + 1 ≢ y + 1); without it they are
        matched by position.
    """

    float_rounding: int = 6
    numeric_precision: int = 15
    relations_as_sets: bool = True
    strict_variables: bool = True

    def __post_init__(self) -> None:
        if self.float_rounding < 1 or self.numeric_precision < 1:
            raise ValueError("float_rounding and numeric_precision must be at least 1")


DEFAULT_OPTIONS = EquivalenceOptions()


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


def _plain_values(answer: str) -> list[tuple[Fraction, int | None]] | None:
    """[(value, decimals written)] of a plain number, two readings for a percentage; else None."""
    match = _PLAIN_NUMBER_RE.fullmatch(answer)
    if match is None:
        return None
    try:
        value = Fraction(match.group("number"))
    except (ValueError, ZeroDivisionError):
        return None
    decimals = match.group("decimals") or match.group("only_decimals")
    written = None if decimals is None else len(decimals)
    readings = [(value, written)]
    if answer.endswith("%"):
        readings.append((value / 100, None if written is None else written + 2))
    return readings


def _numbers_equal(a: tuple[Fraction, int | None], b: tuple[Fraction, int | None], rounding: int) -> bool:
    (x, x_decimals), (y, y_decimals) = a, b
    if x == y:
        return True
    if max(x_decimals or 0, y_decimals or 0) < rounding:
        return False
    return round(x, rounding) == round(y, rounding)


def _union_of_relations(parsed: Any) -> Any:
    """A set of relations in one shared variable as the union of their solution sets."""
    if not isinstance(parsed, FiniteSet) or len(parsed) < 2:
        return parsed
    relations = parsed.args
    if not all(isinstance(relation, Rel) for relation in relations):
        return parsed
    if len(set().union(*(relation.free_symbols for relation in relations))) != 1:
        return parsed  # "x = 3, y = -1" is a system, not a set
    try:
        return Or(*relations).as_set()
    except (NotImplementedError, TypeError, ValueError):
        return parsed


@lru_cache(maxsize=4096)
def parse_answer(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of a canonical LaTeX answer, with relation lists read as sets."""
    parsed = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    return tuple(_union_of_relations(item) for item in parsed)


def _math_equal(predicted: str, reference: str, options: EquivalenceOptions) -> bool:
    if not (is_safe_to_evaluate(predicted) and is_safe_to_evaluate(reference)):
        return False
    gold, target = parse_answer(reference), parse_answer(predicted)
    return bool(gold and target) and verify(
        list(gold),
        list(target),
        float_rounding=options.float_rounding,
        numeric_precision=options.numeric_precision,
        strict=options.strict_variables,
        allow_set_relation_comp=options.relations_as_sets,
        timeout_seconds=None,
    )


def answers_equal(predicted: str, reference: str, options: EquivalenceOptions = DEFAULT_OPTIONS) -> bool:
    """Whether canonical answers `predicted` and `reference` are equivalent, by the module's rules.

    >>> answers_equal("0.5", "1/2"), answers_equal(r"\\frac{1}{2}", "0.5"), answers_equal("18", "19")
    (True, True, False)
    >>> answers_equal("0.25", "25%"), answers_equal("(C) 12", "(C)"), answers_equal("3, 2", "2, 3")
    (True, True, True)
    """
    if predicted == reference:
        return True
    predicted_values, reference_values = _plain_values(predicted), _plain_values(reference)
    if predicted_values is not None and reference_values is not None:
        return any(_numbers_equal(p, r, options.float_rounding) for p in predicted_values for r in reference_values)
    reference_choice = choice(reference, leading=True)
    if reference_choice is not None:
        if choice(predicted, leading=True) == reference_choice:
            return True
        value = choice_value(reference)  # "(D) 60": the value 60 answers it too
        return bool(value) and answers_equal(predicted, value, options)
    reference_words, predicted_words = words(reference), words(predicted)
    if reference_words in ("yes", "no"):
        return first_word(predicted) == reference_words
    if reference_words is not None or predicted_words is not None:
        return reference_words == predicted_words
    return any(
        _math_equal(p, r, options)
        for p in _readings(predicted, predicted_values)
        for r in _readings(reference, reference_values)
    )


def _readings(answer: str, values: list[tuple[Fraction, int | None]] | None) -> list[str]:
    """A percentage's two readings as numbers for sympy ("25%" -> "25", "1/4"); else the answer."""
    return [answer] if values is None or len(values) == 1 else [str(value) for value, _ in values]
