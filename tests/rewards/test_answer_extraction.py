"""Final-answer extraction: marker priority, several boxes, formulas, and bounded scanning."""

import pytest

from r1kit.rewards.rules.answer_extraction import (
    MAX_SCAN_CHARS,
    extract_final_answer,
    final_boxes,
    last_boxed,
    reference_span,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed{} beats everything, and the last one wins
        (r"<answer> 3 </answer> so \boxed{4} and then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        # <answer> tags beat "####"; a box inside the tags is unwrapped
        ("#### 7\n<think> 12 + 7 = 19 </think> <answer> 38 </answer>", " 38 "),
        (r"<answer> \boxed{5} </answer>", "5"),
        ("<answer> 38", " 38"),  # unclosed tag runs to the end
        # "####" beats "The answer is"
        ("The answer is 5.\n#### 6", "6"),
        ("So the answer is $18.\nThe final answer is 19 dollars.", "19 dollars."),
        # "The answer is" beats "Answer:"; a marker's answer ends with its sentence
        ("Answer: 3\nthe answer is: 4", "4"),
        ("Final Answer: 1,234", "1,234"),
        ("**Answer:** 7. Hmm, let me double-check: 1024 - 1017 = 7. Yes.", "** 7."),
        # with no marker: the last formula or the last number, whichever ends later
        ("Hence $$f(y) = y$$", "f(y) = y"),
        (r"So the set is \[ \{1, 2\} \]", r" \{1, 2\} "),
        (r"The midpoint is \(\left(\frac{1}{2}, 3\right)\).", r"\left(\frac{1}{2}, 3\right)"),
        ("so $x = 4$, and 5 of them remain", "5"),
        ("It costs $5 and $7 more, 12 in all", "12"),  # dollar signs, not a formula
        # calculator annotations are ignored; separators and decimals are kept
        ("She makes 9 * 2 = $<<9*2=18>>18.5 a day", "18.5"),
        ("It costs 1,000,000 dollars.", "1,000,000"),
        ("no numbers here", None),
    ],
)
def test_extraction_priority(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{2}, \boxed{3}", "2, 3"),
        (r"roots: \(\boxed{-2}\) \quad \(\boxed{1}\)", "-2, 1"),  # spacing alone reads as a comma
        (r"so $\boxed{x=1}$ or $\boxed{x=-3}$.", "x=1 or x=-3"),
        (r"$x = \boxed{\tfrac12}$ or $x = \boxed{2}$", r"x = \tfrac12 or x = 2"),
        # prose between boxes: only the last one counts (a corrected answer)
        (r"so $\boxed{(2,1)}$, wait, the pair is $(x, y)$, so it should be $\boxed{(1,2)}$", "(1,2)"),
        (r"\boxed{1 + {2}", None),  # unbalanced
        ("no box", None),
    ],
)
def test_final_boxes(text, expected):
    assert final_boxes(text) == expected


def test_reference_spans():
    assert reference_span("Janet sells 9 eggs.\n#### 18") == "18"
    assert reference_span(r"The sum is $7 \cdot 4 = \boxed{28}$.") == "28"
    assert reference_span("$2, 3$") == "$2, 3$"  # a bare answer is the whole reference


def test_unbalanced_box_and_only_the_tail_is_scanned():
    assert last_boxed(r"\boxed{1 + {2}") is None
    text = r"\boxed{1}" + "x" * MAX_SCAN_CHARS + " 2"
    assert extract_final_answer(text) == "2"
