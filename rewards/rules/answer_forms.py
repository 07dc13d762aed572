"""Canonical forms of answer spans: plain numbers, percentages, words, choices and LaTeX.

`canonical_answer` turns an extracted span into one string the verifier compares:

- a plain number when the span is one ("**$1,234.50** dollars." -> "1234.50"), with
  a trailing "%" kept for percentages ("25\\%" -> "25%");
- otherwise cleaned LaTeX for math-verify: math delimiters, markdown, \\text{} and
  font commands, \\left/\\right, \\dfrac/\\tfrac, thin spaces, degree signs, thousands
  separators, "x \\in" before a set and a trailing period are removed.

`words`, `first_word`, `choice` and `choice_value` read the answers that are not
mathematics: words ("\\text{odd}", "Sunday", "No, it cannot be done") and
multiple-choice letters ("(C)", "\\textbf{(C)} 12").
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 400  # a longer "final answer" is not an answer

NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\.\d+"  # "1,234.5", "-3", ".5"
_LEADING_NUMBER_RE = re.compile(
    rf"^(?P<number>{NUMBER})(?:\s*/\s*(?P<denominator>\d+)(?![\d.]))?\s*(?P<percent>%|\\%|percent\b)?"
)
# "2\sqrt{2}", "3 + 4", "5!", "2x": not a number plus a unit
_MATH_CONTINUES_RE = re.compile(r"\s*[\\^_{*/+\-=×·(\[\d!]|[A-Za-z](?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACE_BETWEEN_DIGITS_RE = re.compile(r"(?<=\d)(?:(?<!\\)\\[,;:! ]|\{,\}|,(?=\\!)|\s)+(?=\d{3}(?!\d))")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad\b|~")
_TRAILING_UNIT_RE = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z]+\.?\s*\}(?:\s*\^\s*\{?[23]\}?)?\s*$")
_QUALIFIER_RE = re.compile(r"(?:,|\\q?quad)?\s*\\text\s*\{\s*(?:for|where|when|if|with|since)\b.*$", re.DOTALL)
_SIZED_DELIMITER_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\s*\.?")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree\b|\bdegrees?\b")
_ELEMENT_OF_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*\\in\s+")
# "x = 5", "f(2) = 5", "9 * 2 = 18": a name or arithmetic on the left, a number on the right
_ASSIGNED_NUMBER_RE = re.compile(
    rf"^(?:[A-Za-z](?:_\{{?\w+\}}?)?(?:\([^()=]*\))?|(?:[\d\s.,+\-*/×·()]|\\cdot|\\times)+)"
    rf"\s*=\s*(?P<value>(?:{NUMBER})\s*(?:%|\\%)?)\s*$"
)
_EQUALS_RE = re.compile(r"(?<![<>!\\])=")
_LIST_RE = re.compile(r"[,;]|\b(?:and|or)\b")
_IMAGINARY_UNIT_RE = re.compile(r"(?<![A-Za-z\\_])i(?![A-Za-z])")
_REPLACEMENTS = (
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\varnothing", "\\emptyset"),
    ("\\displaystyle", ""),
)
_CURRENCY = "$€£¥₹"
_DELIMITERS = ("\\(", "\\)", "\\[", "\\]", "\\$", "$", "**", "__", "`")
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z' -]*")
_CHOICE_RE = re.compile(r"\(([A-E])\)|([A-E])")
_LEADING_CHOICE_RE = re.compile(r"\(([A-E])\)(?:\s|$)")
_FIRST_WORD_RE = re.compile(r"[A-Za-z]+")


def _clean_latex(span: str) -> str:
    """`span` without wrappers, spacing and typographic variants that do not change its value."""
    span = _QUALIFIER_RE.sub("", _TRAILING_UNIT_RE.sub("", span.strip()))  # "9\pi\text{ cm}^2" -> "9\pi"
    span = _TEXT_COMMAND_RE.sub(r" \1 ", _TEXT_COMMAND_RE.sub(r" \1 ", span))  # two levels: \textbf{\text{x}}
    for delimiter in _DELIMITERS:
        span = span.replace(delimiter, " ")
    for old, new in _REPLACEMENTS:
        span = span.replace(old, new)
    span = _SPACE_BETWEEN_DIGITS_RE.sub("", span)  # 1\,000 and 10,\!000 -> 1000 and 10,000
    span = _SPACING_RE.sub(" ", span).replace("{,}", ",")
    span = _SIZED_DELIMITER_RE.sub("", span)
    span = _DEGREES_RE.sub("", span)
    span = _THOUSANDS_RE.sub("", span)  # 1,234 -> 1234, inside LaTeX too
    span = _ELEMENT_OF_RE.sub("", span.strip())  # "x \in (1, 2)" -> "(1, 2)"
    sides = _EQUALS_RE.split(span)
    if len(sides) > 2 and not _LIST_RE.search(span):
        span = sides[-1]  # a chain "(2+i)^2 = 4 + 4i - 1 = 3+4i" ends in its value
    span = _IMAGINARY_UNIT_RE.sub("I", span)  # a lone i is the imaginary unit, sympy's I
    return " ".join(span.split()).rstrip(".").strip()


def canonical_answer(span: str) -> str | None:
    """Canonical form of an answer span: a plain number string when it is a number, else LaTeX.

    A span is a number when it starts with one that no math continues and no other number
    follows ("18 dollars", not "2\\sqrt{2}", "3 + 4" or "9 (or maybe 11)"). Thousands
    separators, currency, \\text{} and unit words go; a percentage keeps its number and
    a "%" ("25%"), "3/4" stays a fraction, and "x = 5" is its value.
    Returns None for an empty or over-long span.

    >>> canonical_answer("**$1,234.50** dollars.")
    '1234.50'
    >>> canonical_answer(r"\\$18"), canonical_answer(r"25\\%"), canonical_answer("x = 5")
    ('18', '25%', '5')
    >>> canonical_answer(r"\\left( \\dfrac{1}{2}, 3 \\right)")
    '( \\\\frac{1}{2}, 3 )'
    """
    span = _clean_latex(span)
    if not span or len(span) > MAX_ANSWER_CHARS:
        return None
    assigned = _ASSIGNED_NUMBER_RE.match(span)
    if assigned is not None:
        span = assigned.group("value")
    number_span = span.lstrip(_CURRENCY).strip()
    match = _LEADING_NUMBER_RE.match(number_span)
    if match is None or _MATH_CONTINUES_RE.match(number_span, match.end()):
        return span
    if any(char.isdigit() for char in number_span[match.end() :]):
        return span  # "9 (or possibly 11)": not one number
    number = match.group("number").replace(",", "").replace("−", "-").lstrip("+")
    denominator = match.group("denominator")
    number = number if denominator is None else f"{number}/{denominator}"
    return number + "%" if match.group("percent") else number


def words(answer: str) -> str | None:
    """The answer as lower-case words when it is words ("Sunday", "no"), else None.

    >>> words("  Circle "), words("x + 1"), words("(odd)")
    ('circle', None, 'odd')
    """
    text = answer.strip().strip("()").strip()
    if len(text) < 2 or not _WORDS_RE.fullmatch(text):
        return None
    return " ".join(text.lower().split())


def first_word(answer: str) -> str | None:
    """The first word of the answer, lower-case ("No, it cannot be done." -> "no"); None without one."""
    match = _FIRST_WORD_RE.search(answer)
    return None if match is None else match.group(0).lower()


def choice(answer: str, *, leading: bool = False) -> str | None:
    """The multiple-choice letter A-E that `answer` is ("(C)", "C"); else None.

    With `leading`, a parenthesised letter that starts the answer counts too ("(C) 12").

    >>> choice("(C)"), choice("(C) 12"), choice("(C) 12", leading=True)
    ('C', None, 'C')
    """
    answer = answer.strip()
    match = _CHOICE_RE.fullmatch(answer)
    if match is None and leading:
        match = _LEADING_CHOICE_RE.match(answer)
    if match is None:
        return None
    return next(group for group in match.groups() if group is not None)


def choice_value(answer: str) -> str:
    """What follows a leading choice letter: "(D) 60" -> "60"; "" when nothing does."""
    match = _LEADING_CHOICE_RE.match(answer.strip())
    return "" if match is None else answer.strip()[match.end() :].strip()
