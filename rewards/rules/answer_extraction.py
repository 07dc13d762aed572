"""Final-answer extraction: find the answer span in a completion and canonicalise it.

A completion's final answer is the first of these that is present (the last
occurrence of each marker wins, since models restate and correct themselves):

    1. \\boxed{...}                (brace-balanced; \\fbox{} too)
    2. <answer>...</answer>       (the R1 answer tags; an unclosed tag runs to the end)
    3. "#### ..."                  (GSM8K's solution format)
    4. "The answer is ..."         ("the final answer is" too, case-insensitive)
    5. "Answer: ..."               ("Final answer:" too)
    6. the last number in the text

The span is then canonicalised for the verifier (`canonical_answer`): markdown
bold, LaTeX math delimiters, currency signs, thousands separators, a trailing
period and trailing unit words are removed, so "**$1,234.50** dollars." becomes
"1234.50". A span that does not start with a number (\\frac{1}{2}, x + 1, ...)
is returned as LaTeX for math-verify to parse.

Everything here is linear-time string scanning on bounded input: the text is
cut to its last `MAX_SCAN_CHARS` characters and spans to `MAX_ANSWER_CHARS`,
so hostile completions cannot make extraction slow.
"""

from __future__ import annotations

import re
from collections import deque

MAX_SCAN_CHARS = 20_000  # only the tail of a completion can hold its final answer
MAX_ANSWER_CHARS = 400  # a longer "final answer" is not an answer

_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_LEADING_NUMBER_RE = re.compile(
    rf"^(?P<number>{_NUMBER})(?:\s*/\s*(?P<denominator>\d+)(?![\d.]))?\s*(?P<percent>%|\\%|percent\b)?"
)
_MATH_CONTINUES_RE = re.compile(r"\s*[\\^_{*/+\-=×·(\[\d]")  # "2\sqrt{2}", "3 + 4": not a number plus a unit
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|textbf|mbox)\s*\{([^{}]*)\}")
_CALCULATOR_RE = re.compile(r"<<[^<>\n]{0,200}>>")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_THE_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"\banswer\s*:\s*([^\n]*)", re.IGNORECASE)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_CURRENCY = "$€£¥₹"
_DELIMITERS = ("\\(", "\\)", "\\[", "\\]", "\\$", "$", "**", "__", "`")


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the '}' closing the '{' at `open_index`, or None when unbalanced."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}); None when there is none or it is unclosed.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{7}")
    '7'
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    open_index = text.find("{", start)
    if open_index < 0 or text[start:open_index].strip() not in _BOX_COMMANDS:
        return None
    close_index = _matching_brace(text, open_index)
    return None if close_index is None else text[open_index + 1 : close_index]


def answer_tag_content(text: str, open_tag: str = "<answer>", close_tag: str = "</answer>") -> str | None:
    """Content of the last `open_tag`...`close_tag` (to the end when unclosed); None without the tag."""
    start = text.rfind(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return text[start:] if end < 0 else text[start:end]


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


def _last_marker(pattern: re.Pattern[str], text: str) -> str | None:
    match = _last_match(pattern, text)
    return None if match is None else match.group(1)


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators and decimals kept), or None."""
    match = _last_match(_NUMBER_RE, text)
    return None if match is None else match.group(0)


def extract_final_answer(text: str) -> str | None:
    """The raw final-answer span of a completion, by the priority in the module docstring.

    >>> extract_final_answer("<think> 12 + 7 = 19 </think> <answer> 19 </answer>")
    ' 19 '
    >>> extract_final_answer("She makes 9 * 2 = $<<9*2=18>>18 a day.\\n#### 18")
    '18'
    """
    text = _CALCULATOR_RE.sub("", text[-MAX_SCAN_CHARS:])
    for found in (
        last_boxed(text),
        answer_tag_content(text),
        _last_marker(_HASHES_RE, text),
        _last_marker(_THE_ANSWER_IS_RE, text),
        _last_marker(_ANSWER_COLON_RE, text),
    ):
        if found is not None and found.strip():
            return found
    return last_number(text)


def _strip_wrappers(span: str) -> str:
    """Remove markdown/LaTeX wrappers, currency signs and a trailing period from an answer span."""
    span = _TEXT_COMMAND_RE.sub(r" \1 ", span.strip())
    for delimiter in _DELIMITERS:
        span = span.replace(delimiter, " ")
    span = span.replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    span = _THOUSANDS_RE.sub("", span)  # 1,234 -> 1234, inside LaTeX too
    span = span.strip().rstrip(".").strip()
    boxed = last_boxed(span)
    if boxed is not None:
        span = boxed.strip()
    if "=" in span:  # "x = 5" -> "5": the value after the last equals sign
        span = span.rsplit("=", 1)[1]
    return span.strip().lstrip(_CURRENCY).strip()


def canonical_answer(span: str) -> str | None:
    """Canonical form of an answer span: a plain number string when it is a number, else LaTeX.

    A span is a number when it starts with one that no math continues ("18 dollars",
    not "2\\sqrt{2}" or "3 + 4"). Thousands separators, currency, \\text{} and unit
    words go; a percentage keeps its number (GSM8K asks "what percent..." and
    expects 25, not 0.25); "3/4" stays a fraction.
    Returns None for an empty or over-long span.

    >>> canonical_answer("**$1,234.50** dollars.")
    '1234.50'
    >>> canonical_answer(r"\\$18")
    '18'
    >>> canonical_answer("25%")
    '25'
    >>> canonical_answer(r"\\frac{1}{2}")
    '\\\\frac{1}{2}'
    """
    span = _strip_wrappers(span)
    if not span or len(span) > MAX_ANSWER_CHARS:
        return None
    match = _LEADING_NUMBER_RE.match(span)
    if match is None or _MATH_CONTINUES_RE.match(span, match.end()):
        return span
    number = match.group("number").replace(",", "").replace("−", "-").lstrip("+")
    denominator = match.group("denominator")
    return number if denominator is None else f"{number}/{denominator}"


def reference_answer(reference: str) -> str | None:
    """Canonical answer of a reference: a bare value, or a worked solution ending in "#### N".

    >>> reference_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\\n#### 18")
    '18'
    >>> reference_answer("\\\\frac{3}{4}")
    '\\\\frac{3}{4}'
    """
    reference = str(reference)
    hashes = _last_marker(_HASHES_RE, reference)
    if hashes is not None:
        reference = hashes
    elif last_boxed(reference) is not None:
        reference = last_boxed(reference) or ""
    return canonical_answer(reference)
