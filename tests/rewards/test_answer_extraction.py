"""Final-answer extraction order and canonical forms."""

import pytest

from rewards.rules.answer_extraction import (
    MAX_SCAN_CHARS,
    canonical_answer,
    extract_final_answer,
    last_boxed,
    reference_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed{} beats everything, and the last one wins
        (r"<answer> 3 </answer> so \boxed{4} and then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        # <answer> tags beat "####"
        ("#### 7\n<think> 12 + 7 = 19 </think> <answer> 38 </answer>", " 38 "),
        ("<answer> 38", " 38"),  # unclosed tag runs to the end
        # "####" beats "The answer is"
        ("The answer is 5.\n#### 6", "6"),
        ("So the answer is $18.\nThe final answer is 19 dollars.", "19 dollars."),
        # "The answer is" beats "Answer:"
        ("Answer: 3\nthe answer is: 4", "4"),
        ("Final Answer: 1,234", "1,234"),
        # last number, with separators and decimals kept, calculator annotations ignored
        ("She makes 9 * 2 = $<<9*2=18>>18.5 a day", "18.5"),
        ("It costs 1,000,000 dollars.", "1,000,000"),
        ("no numbers here", None),
    ],
)
def test_extraction_priority(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ("**$1,234.50** dollars.", "1234.50"),
        (r"\$18", "18"),
        ("$18.", "18"),
        ("25%", "25"),
        (r"25\%", "25"),
        ("3/4 of a cup", "3/4"),
        ("−5", "-5"),
        ("x = 5", "5"),
        (r"\boxed{42}", "42"),
        (r"18 \text{ dollars}", "18"),
        (r"2\sqrt{2}", r"2\sqrt{2}"),  # a number followed by math is not a number with a unit
        ("3 + 4", "3 + 4"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        (r"\frac{3,000}{1}", r"\frac{3000}{1}"),
        ("(1,2)", "(1,2)"),
        ("", None),
        ("9" * 500, None),
    ],
)
def test_canonical_answer(span, expected):
    assert canonical_answer(span) == expected


def test_reference_forms():
    assert reference_answer("Janet sells 9 eggs.\n#### 18") == "18"
    assert reference_answer("1,000") == "1000"
    assert reference_answer(r"so \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert reference_answer("   ") is None


def test_unbalanced_box_and_only_the_tail_is_scanned():
    assert last_boxed(r"\boxed{1 + {2}") is None
    text = r"\boxed{1}" + "x" * MAX_SCAN_CHARS + " 2"
    assert extract_final_answer(text) == "2"
