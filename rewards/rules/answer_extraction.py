"""Final-answer extraction: find the span of a completion that holds its final answer.

A completion's final answer is the first of these that is present (the last
occurrence of each marker wins, since models restate and correct themselves):

    1. \\boxed{...}                (brace-balanced; \\fbox{} too). Boxes separated only by
                                  commas, "and", "or", spacing or "x =" form one answer:
                                  "x = \\boxed{2} or x = \\boxed{3}" is "x = 2 or x = 3"
    2. <answer>...</answer>       (the R1 answer tags; an unclosed tag runs to the end)
    3. "#### ..."                  (GSM8K's solution format)
    4. "The answer is ..."         ("the final answer is" too, case-insensitive)
    5. "Answer: ..."               ("Final answer:", "**Answer:**" too)
    6. the last display or inline formula ($$...$$, \\[...\\], \\(...\\), $...$) or the
       last number, whichever ends later

A reference answer is read the same way when it carries a marker (a worked
solution ending in "#### N" or in \\boxed{}); otherwise it is the answer itself.

Everything here is linear-time string scanning on bounded input: the text is
cut to its last `MAX_SCAN_CHARS` characters, so hostile completions cannot make
extraction slow. Canonical forms of the spans are in `answer_forms`.
"""

from __future__ import annotations

import re
from collections import deque

from r1kit.rewards.rules.answer_forms import NUMBER

MAX_SCAN_CHARS = 20_000  # only the tail of a completion can hold its final answer

_NUMBER_RE = re.compile(NUMBER)
_CALCULATOR_RE = re.compile(r"<<[^<>\n]{0,200}>>")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_THE_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"\banswer\s*:\s*([^\n]*)", re.IGNORECASE)
# Formulas: display $$...$$, \[...\], \(...\), and inline $...$ with no space inside either
# dollar and no digit after the closing one, so that "costs $5 and $7" is not a formula.
_FORMULA_RE = re.compile(
    r"\$\$(?P<display>[^$]{1,500}?)\$\$"
    r"|\\\[(?P<bracket>.{1,500}?)\\\]"
    r"|\\\((?P<paren>.{1,500}?)\\\)"
    r"|(?<![$\\])\$(?P<inline>[^\s$](?:[^$]{0,500}?[^\s$\\])?)\$(?![\d$])",
    re.DOTALL,
)
# What may separate boxes that together form one answer: punctuation, spacing, math
# delimiters, "and"/"or", and assignments such as "x =" or "x_2 =".
_BOX_SEPARATOR_RE = re.compile(
    r"(?:\s|[,;$]|\\[()]|\\q?quad|\\[,;!: ]|\\text\{\s*(?:and|or)\s*\}|\band\b|\bor\b"
    r"|[A-Za-z](?:_\{?\w+\}?)?\s*=)*"
)
_SENTENCE_END_RE = re.compile(r"(?<=\.)\s+(?=[A-Z])")  # "7. Hmm, let me check" ends at "7."
_MATH_DELIMITER_RE = re.compile(r"\$|\\[()]")
_HAS_WORD_RE = re.compile(r"[,;=]|\b(?:and|or)\b")  # a gap without these is spacing: read as a comma
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_GAP = 60  # longer text between two boxes is prose, not a separator


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


def _box_before(text: str, end: int) -> tuple[int, int, int] | None:
    """(start, open brace, close brace) of the last complete box starting before `end`."""
    start = max(text.rfind(command, 0, end) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    open_index = text.find("{", start)
    if open_index < 0 or text[start:open_index].strip() not in _BOX_COMMANDS:
        return None
    close_index = _matching_brace(text, open_index)
    return None if close_index is None else (start, open_index, close_index)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}); None when there is none or it is unclosed.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{7}")
    '7'
    """
    box = _box_before(text, len(text))
    return None if box is None else text[box[1] + 1 : box[2]]


def final_boxes(text: str) -> str | None:
    """The last box, joined with the boxes before it that only separators divide from it.

    Each box is replaced by its content, so several boxes read as a list.
    None when the text has no complete box.

    >>> final_boxes(r"Checking: \\boxed{5}? No. The roots are \\boxed{2} and \\boxed{3}.")
    '2 and 3'
    >>> final_boxes(r"so $x = \\boxed{2}$ or $x = \\boxed{3}$")
    'x = 2 or x = 3'
    """
    box = _box_before(text, len(text))
    if box is None:
        return None
    pieces = [text[box[1] + 1 : box[2]]]
    run_start = box[0]
    while (previous := _box_before(text, run_start)) is not None:
        gap = text[previous[2] + 1 : run_start]
        if previous[2] >= run_start or len(gap) > _MAX_BOX_GAP or not _BOX_SEPARATOR_RE.fullmatch(gap):
            break
        gap = _MATH_DELIMITER_RE.sub("", gap)
        pieces = [text[previous[1] + 1 : previous[2]], gap if _HAS_WORD_RE.search(gap) else ", ", *pieces]
        run_start = previous[0]
    if len(pieces) > 1:  # keep the assignment that leads the first box: "x = \boxed{2}, ..."
        lead = re.search(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*$", text[max(0, run_start - 20) : run_start])
        if lead is not None:
            pieces.insert(0, lead.group(0))
    return "".join(pieces)


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
    """What follows the last `pattern` on its line, up to the end of its sentence."""
    match = _last_match(pattern, text)
    return None if match is None else _SENTENCE_END_RE.split(match.group(1), maxsplit=1)[0]


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators and decimals kept), or None."""
    match = _last_match(_NUMBER_RE, text)
    return None if match is None else match.group(0)


def _last_formula_or_number(text: str) -> str | None:
    """The last formula's content, or the last number when that ends later; None without either."""
    formula = _last_match(_FORMULA_RE, text)
    number = _last_match(_NUMBER_RE, text)
    if formula is not None and (number is None or formula.end() >= number.end()):
        return next(group for group in formula.groups() if group is not None)
    return None if number is None else number.group(0)


def extract_final_answer(text: str) -> str | None:
    """The raw final-answer span of a completion, by the priority in the module docstring.

    >>> extract_final_answer("<think> 12 + 7 = 19 </think> <answer> 19 </answer>")
    ' 19 '
    >>> extract_final_answer("She makes 9 * 2 = $<<9*2=18>>18 a day.\\n#### 18")
    '18'
    >>> extract_final_answer("Hence $$f(y) = y$$ for every y.")
    'f(y) = y'
    """
    text = _CALCULATOR_RE.sub("", text[-MAX_SCAN_CHARS:])
    for found in (
        final_boxes(text),
        answer_tag_content(text),
        _last_marker(_HASHES_RE, text),
        _last_marker(_THE_ANSWER_IS_RE, text),
        _last_marker(_ANSWER_COLON_RE, text),
    ):
        if found is not None and found.strip():
            return final_boxes(found) or found  # "<answer> \boxed{5} </answer>" is 5
    return _last_formula_or_number(text)


def reference_span(reference: str) -> str:
    """The answer span of a reference: after "####", the final boxes, or the whole reference.

    >>> reference_span("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\\n#### 18")
    '18'
    >>> reference_span(r"so the sum is $\\boxed{28}$.")
    '28'
    >>> reference_span("$2, 3$")
    '$2, 3$'
    """
    hashes = _last_marker(_HASHES_RE, reference)
    if hashes is not None:
        return hashes
    boxes = final_boxes(reference[-MAX_SCAN_CHARS:])
    return reference if boxes is None else boxes
