"""The reward contract: how functions are called and what they may return."""

import math

import pytest
import torch

from r1kit.rewards.protocol import (
    RewardLog,
    RewardOutputError,
    call_reward,
    check_scores,
    completion_text,
    reward_name,
    trl_completions,
)


def test_trl_style_function_gets_prompts_and_columns_by_keyword():
    def trl_reward(prompts, completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    assert call_reward(trl_reward, ["1", "2"], ["p", "q"], {"answer": ["1", "3"], "extra": [0, 0]}) == [
        1.0,
        0.0,
    ]


def test_function_receives_only_the_keywords_it_declares():
    def narrow(texts, answer):
        return [float(t == a) for t, a in zip(texts, answer, strict=True)]

    assert call_reward(narrow, ["7"], ["p"], {"answer": ["7"], "unused": [1]}) == [1.0]


def test_async_function_is_awaited():
    async def async_reward(completions, **kwargs):
        return [0.5 for _ in completions]

    assert call_reward(async_reward, ["a", "b"], ["p", "q"], {}) == [0.5, 0.5]


def test_none_nan_bool_and_tensor_outputs():
    assert check_scores([None, math.nan, True, 2], 4, "r") == [None, None, 1.0, 2.0]
    assert check_scores(torch.tensor([0.25, 1.0]), 2, "r") == [0.25, 1.0]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([1.0], "returned 1 scores for 2 completions"),
        (["1", 1.0], "returned '1' (str) for completion 0"),
        ([1.0, math.inf], "returned inf (float) for completion 1"),
        (1.0, "returned float, expected a list"),
    ],
)
def test_bad_outputs_raise_naming_the_reward(output, message):
    with pytest.raises(RewardOutputError, match="reward 'my_reward'") as error:
        check_scores(output, 2, "my_reward")
    assert message in str(error.value)


def test_conversational_completion_and_names():
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    with pytest.raises(TypeError, match="string or a list of messages"):
        completion_text(3)

    class Scorer:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    def named(completions, **kwargs):
        return []

    assert reward_name(named) == "named"
    assert reward_name(Scorer()) == "Scorer"


def test_trainer_keywords_reach_a_function_unless_it_is_elementwise():
    def trl_reward(completions, trainer_state, log_extra, log_metric, **kwargs):
        log_extra("step", [trainer_state] * len(completions))
        log_metric("calls", 1)
        return [1.0] * len(completions)

    def rule(completions, **columns):
        return [float(not {"trainer_state", "log_extra", "log_metric"} & set(columns))] * len(completions)

    rule.elementwise = True
    log = RewardLog()
    assert call_reward(trl_reward, ["a", "b"], ["p", "q"], {}, trainer_state=7, log=log) == [1.0, 1.0]
    assert log == RewardLog(extra=[("step", [7, 7])], metrics=[("calls", 1.0)])
    assert call_reward(rule, ["a"], ["p"], {}, trainer_state=7) == [1.0]


def test_trl_completions_are_messages_when_the_first_prompt_is_a_conversation():
    chat = [{"role": "user", "content": "1 + 1?"}]
    assert trl_completions([chat, chat], ["2", [{"role": "assistant", "content": "3"}]]) == [
        [{"role": "assistant", "content": "2"}],
        [{"role": "assistant", "content": "3"}],
    ]
    assert trl_completions(["1 + 1 =", chat], [" 2", "2"]) == [" 2", "2"]  # TRL looks at the first prompt only
    assert trl_completions([], []) == []
