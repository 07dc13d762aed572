"""Format reward: R1's think-then-answer layout, configurable tags."""

import pytest

from r1kit.rewards import FormatReward, format_reward

DEMO = "<think> 12 + 7 = 19 . 19 * 2 = 38 </think> <answer> 38 </answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (DEMO, 1.0),
        ("\n" + DEMO + "\n", 1.0),
        ("<think>a</think>\n\n<answer>b</answer>", 1.0),
        ("<answer> 38 </answer>", 0.0),
        ("<think> 38 </think>", 0.0),
        ("<think></think><answer>38</answer>", 0.0),  # empty reasoning
        ("<think>a</think><answer> </answer>", 0.0),  # empty answer
        ("<think>a</think> extra <answer>38</answer>", 0.0),
        ("<think>a</think><answer>38</answer> trailing", 0.0),
        ("<think>a<think>b</think><answer>38</answer>", 0.0),
        ("<think>a</think></think><answer>38</answer>", 0.0),
        ("<think>a</think><answer>3<answer>8</answer>", 0.0),
        ("<answer>38</answer><think>a</think>", 0.0),
    ],
)
def test_default_tags(completion, expected):
    assert format_reward([completion]) == [expected]


def test_configured_tags_and_prompt_opened_think():
    reward = FormatReward(think_tags=("<reasoning>", "</reasoning>"), answer_tags=None)
    assert reward(["<reasoning>x</reasoning> 38", "<reasoning>x</reasoning>"]) == [1.0, 0.0]
    opened = FormatReward(think_opened_in_prompt=True)
    assert opened(["12 + 7 = 19 </think> <answer> 19 </answer>", DEMO]) == [1.0, 0.0]


def test_bad_tags_raise():
    with pytest.raises(ValueError, match="think_tags"):
        FormatReward(think_tags=("<t>", "<t>"))
    with pytest.raises(ValueError, match="answer_tags"):
        FormatReward(answer_tags=("<a>",))


def test_linear_time_on_long_input():
    assert format_reward(["<think>" + "x" * 2_000_000]) == [0.0]
