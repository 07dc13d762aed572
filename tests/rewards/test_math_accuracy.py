"""Math accuracy: equivalences, configuration, and inputs built to make a verifier hang."""

import time

import pytest

from r1kit.rewards import MathAccuracy, math_accuracy
from r1kit.rewards.rules.math_accuracy import score_answer
from r1kit.rewards.rules.math_equivalence import answers_equal, is_safe_to_evaluate


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
        ("Answer: 0.3333333", "1/3", 1.0),  # rounded to 6 decimals
        ("Answer: 0.666667", "2/3", 1.0),
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


@pytest.mark.parametrize(
    ("reference", "completion"),
    [
        ("$f(y) = y$", "$$f(y) = y$$"),
        ("$2, 3$", r"\boxed{2}, \boxed{3}"),
        ("$(p,q)=(3,2)$", "$(3,2)$"),
        (r"$1\leq|z|\leq \frac{3}{2}$", r"$z \in [-\frac{3}{2}, -1] \cup [1, \frac{3}{2}]$"),
        (r"$\text{odd}$", "$odd$"),
        (r"$V_1:V_2=11:21$", r"The ratio is \boxed{11:21}."),
        (r"x<-1 \text{ or } x>2", r"\boxed{(-\infty,-1)\cup(2,\infty)}"),
        ("(-2, 2)", r"\boxed{|x| < 2}"),
        (r"\{1, 2, 3\}", r"\boxed{\{3,1,2\}}"),
        ("(1,2),(3,4)", r"\boxed{(3,4),(1,2)}"),
        (r"\text{(E)}", r"\boxed{\textbf{(E)}\ 12}"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\boxed{\begin{bmatrix} 1&2\\3&4 \end{bmatrix}}"),
        (r"\dfrac{3}{4}", r"\boxed{\tfrac34}"),
        (r"10,\!000", r"\boxed{10000}"),
        (r"25\%", r"$\frac{10}{40} = 0.25$"),
        ("3+4i", r"$(2+i)^2 = 4 + 4i + i^2 = 4i+3$"),
        ("2x - 3y = 6", r"\boxed{y = \frac{2}{3}x - 2}"),
        (r"\textbf{(A) }\frac{1}{2}", r"which is choice A. \boxed{\textbf{(A)}}"),
        (r"\textbf{(D)}\ 60", r"\boxed{60}"),
        (r"\text{Yes}", "**Answer:** Yes, it is possible. It works for every n."),
    ],
)
def test_competition_answer_forms_are_equal(reference, completion):
    assert score_answer(completion, reference) == 1.0


@pytest.mark.parametrize(
    ("reference", "completion"),
    [
        ("$(p,q)=(3,2)$", r"\boxed{(2,3)}"),  # an ordered pair, swapped
        ("$2, 3$", r"\boxed{2}, \boxed{3}, \boxed{5}"),  # an extra solution
        ("3", r"\boxed{3} or \boxed{4}"),  # a hedge between candidates
        ("9", "**Answer:** 9 (or possibly 11 if the endpoints are counted)"),
        ("[2, 5)", r"\boxed{[2,5]}"),
        (r"x \geq 2", r"\boxed{(2, \infty)}"),
        (r"\text{even}", r"\boxed{\text{odd}}"),
        (r"\text{(B)}", r"\boxed{(D)}"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}}"),
        (r"\frac{x^2}{4}+\frac{y^2}{3}=1", r"\boxed{\frac{x^2}{3}+\frac{y^2}{4}=1}"),
        (r"25\%", r"\boxed{2.5\%}"),
        ("2\\pi", r"\boxed{6.28}"),
        ("15", r"\boxed{15} is what I first thought, but the count is actually \boxed{30}"),
        (r"\textbf{(D)}\ 60", r"\boxed{(B)}"),
        (r"\text{No}", "**Answer:** Yes, it can be done."),
    ],
)
def test_near_misses_score_zero(reference, completion):
    assert score_answer(completion, reference) == 0.0


def test_strictness_options():
    assert MathAccuracy()([r"\boxed{x > 2}"], answer=[r"(2, \infty)"]) == [1.0]
    assert MathAccuracy(relations_as_sets=False)([r"\boxed{x > 2}"], answer=[r"(2, \infty)"]) == [0.0]
    assert MathAccuracy()(["Answer: 0.333"], answer=["1/3"]) == [0.0]
    assert MathAccuracy(float_rounding=3)(["Answer: 0.333"], answer=["1/3"]) == [1.0]
    assert MathAccuracy()([r"\boxed{y + 1}"], answer=["x + 1"]) == [0.0]
    assert MathAccuracy(strict_variables=False)([r"\boxed{y + 1}"], answer=["x + 1"]) == [1.0]
    with pytest.raises(ValueError, match="float_rounding"):
        MathAccuracy(float_rounding=0)


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
        # million-character completions: only the tail is scanned, and scanning is linear
        "1" * 1_000_000,
        r"\[" * 500_000,
        "$a$ " * 250_000,
        r"\boxed{1} and " * 70_000,
        r"\boxed{" * 150_000,
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
