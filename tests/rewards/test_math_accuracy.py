"""Math accuracy: equivalences, configuration, and inputs built to make a verifier hang."""

import time

import pytest

from rewards import MathAccuracy, math_accuracy
from rewards.rules.math_accuracy import answers_equal, is_safe_to_evaluate, score_answer


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The answer is $1,234.", "1234", 1.0),
        ("**1234**", "#### 1,234", 1.0),
        ("It is 18 dollars.", "18", 1.0),
        ("It costs €18.00", "18", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        ("Answer: 3/4", "0.75", 1.0),
        ("Answer: 0.3333333", "1/3", 1.0),  # math-verify's float rounding
        ("Answer: 0.33", "1/3", 0.0),
        ("So 25% of them.", "25", 1.0),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{x = 5}", "5", 1.0),
        ("<think> 12 + 7 = 19 . 19 * 2 = 38 </think> <answer> 38 </answer>", "38", 1.0),
        ("<think> 12 + 7 = 19 . 19 * 2 = 38 </think> <answer> 39 </answer>", "38", 0.0),
        ("The answer is 10.833333333333332", "#### 18", 0.0),
        ("I do not know.", "18", 0.0),
        ("The answer is 18", "", None),
        ("The answer is 18", None, None),
    ],
)
def test_score_answer(completion, reference, expected):
    assert score_answer(completion, reference) == expected


def test_reads_the_answer_column_and_it_is_configurable():
    completions = [r"\boxed{38}", r"\boxed{40}"]
    assert math_accuracy(completions, prompts=["p", "q"], answer=["38", "38"]) == [1.0, 0.0]
    custom = MathAccuracy(answer_column="solution")
    assert custom(completions, prompts=["p", "q"], solution=["#### 40", "#### 40"]) == [0.0, 1.0]
    with pytest.raises(KeyError, match="'solution'"):
        custom(completions, answer=["38", "38"])
    with pytest.raises(ValueError, match="answer_column"):
        MathAccuracy(answer_column="")


@pytest.mark.parametrize(
    "completion",
    [
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{2^{33220}}",  # a 10,000-digit power
        "The answer is " + "7" * 10_000,
        r"\boxed{" + r"\frac{1}{" * 200 + "2" + "}" * 200 + "}",  # deeply nested LaTeX
        r"\boxed{100000!}",
        r"\boxed{" + "{" * 40 + "1" + "}" * 40 + "}",  # nesting too deep for a final answer
        r"\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    ],
)
def test_pathological_answers_score_zero_quickly(completion):
    start = time.perf_counter()
    assert math_accuracy([completion], answer=["12"]) == [0.0]
    assert time.perf_counter() - start < 1.0


def test_safety_check_and_plain_number_fast_path():
    assert is_safe_to_evaluate(r"2^{10} + \frac{1}{2}")
    assert not is_safe_to_evaluate(r"10^{10^{10}}")
    assert not is_safe_to_evaluate(r"2^{100000}")
    assert answers_equal("1000", "1000.0") and answers_equal(".5", "1/2")
    assert not answers_equal("1/0", "1")
