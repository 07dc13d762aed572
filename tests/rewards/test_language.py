"""Language consistency: share of the reasoning's words in the prompt's script."""

import pytest

from r1kit.rewards import language_consistency
from r1kit.rewards.rules.language import script_word_counts


def test_counts_words_by_script():
    assert script_word_counts(r"Let x be \frac{1}{2} 的 一半 ```python\nprint('hi')\n```") == {
        "LATIN": 2,
        "CJK": 3,
    }


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("What is 12 + 7?", "<think>First add them: twelve plus seven</think> 19", 1.0),
        ("计算 12 加 7", "<think>先 算 加法</think> 19", 1.0),
        ("计算 12 加 7", "<think>Add them up</think><answer>19</answer>", 0.0),
        ("计算十二加七", "<think>十二加七 equals 19</think>", 4 / 5),
        ("Сколько будет два плюс два?", "Два плюс два is four", 3 / 5),
        ("日本語で答えて: これは何ですか", "<think>これはペンです</think>", 1.0),
        ("12 + 7 = ?", "<think>19</think>", None),  # prompt without words
        ("What is 12 + 7?", "<think> 12 + 7 = 19 </think>", None),  # reasoning without words
    ],
)
def test_language_consistency(prompt, completion, expected):
    (score,) = language_consistency([completion], prompts=[prompt])
    assert score == (pytest.approx(expected) if expected is not None else None)
