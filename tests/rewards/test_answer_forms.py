"""Canonical forms of answer spans: numbers, percentages, cleaned LaTeX, words and choices."""

import pytest

from r1kit.rewards.rules.answer_forms import canonical_answer, choice, choice_value, first_word, words


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        # plain numbers: currency, separators, unit words and a trailing period go
        ("**$1,234.50** dollars.", "1234.50"),
        (r"\$18", "18"),
        ("$18.", "18"),
        ("3/4 of a cup", "3/4"),
        ("−5", "-5"),
        (r"18 \text{ dollars}", "18"),
        (r"10,\!000", "10000"),
        (r"1\,000", "1000"),
        ("1{,}000{,}000", "1000000"),
        # percentages keep a "%"
        ("25%", "25%"),
        (r"25\%", "25%"),
        (r"80\,\%", "80%"),
        # a name or arithmetic assigned a number is that number
        ("x = 5", "5"),
        ("9 * 2 = 18", "18"),
        (r"f(2) = 7", "7"),
        # not a single number: math continues, or another number follows
        (r"2\sqrt{2}", r"2\sqrt{2}"),
        ("3 + 4", "3 + 4"),
        ("5!", "5!"),
        ("2i", "2I"),  # a lone i is the imaginary unit
        ("9 (or possibly 11)", "9 (or possibly 11)"),
        # LaTeX is cleaned of what does not change its value
        (r"\left( \dfrac{1}{2}, 3 \right)", r"( \frac{1}{2}, 3 )"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"135^\circ", "135"),
        (r"135^{\circ}", "135"),
        (r"9\pi\text{ cm}^2", r"9\pi"),
        (r"f(n)=n+1\quad\text{for all } n\in\mathbb{N}", "f(n)=n+1"),
        (r"m \in (-\infty,-1]\cup[3,+\infty)", r"(-\infty,-1]\cup[3,+\infty)"),
        (r"\varnothing", r"\emptyset"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"),
        (r"(2+i)^2 = 4 + 4i + i^2 = 4i+3", "4I+3"),  # a chain of equalities ends in its value
        ("x=1 or x=-3", "x=1 or x=-3"),  # a list of equations is kept whole
        (r"\frac{3,000}{1}", r"\frac{3000}{1}"),
        ("(1,2)", "(1,2)"),
        ("", None),
        ("9" * 500, None),
    ],
)
def test_canonical_answer(span, expected):
    assert canonical_answer(span) == expected


def test_words_and_choices():
    assert words("Odd") == words(" odd ") == "odd"
    assert words("no solution") == "no solution"
    assert words("x") is None and words("2x") is None and words(r"\pi") is None
    assert choice("(E)") == choice("E") == "E"
    assert choice("(e)") is None  # lower-case letters are variables, not choices
    assert choice_value("(D) 60") == "60" and choice_value("(D)") == "" and choice_value("60") == ""
    assert first_word("No, it cannot be done.") == "no" and first_word("42") is None
    assert choice("(E) 12") is None and choice("(E) 12", leading=True) == "E"
    assert choice("(F)") is None and choice("Even") is None
