"""TRL's reward-function contract through the suite, in every placement: completions as messages after
conversational prompts, whole-batch calls, and trainer_state / log_extra / log_metric."""

import functools
import time

import pytest
from transformers import TrainerState

from r1kit.rewards import IsolatedReward, RewardSuite, RewardSuiteConfig, resolve

CONTRACT = "tests.rewards.contract_rewards"
HOSTILE = "tests.rewards.hostile_rewards"
CHAT = [
    [{"role": "user", "content": "1 + 1?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
]


def suite(rewards: list, num_workers: int, **config) -> RewardSuite:
    return RewardSuite(rewards, config=RewardSuiteConfig(num_workers=num_workers, **config))


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in_process", "worker"])
def test_completions_are_messages_after_conversational_prompts_and_strings_after_plain_ones(num_workers):
    with suite([f"{CONTRACT}:sees_trl_completions"], num_workers) as rewards:
        chat = rewards.score(CHAT * 2, ["2", "4", "two", "four"])
        plain = rewards.score(["1 + 1 =", "2 + 2 ="], [" 2", " 4"])
    assert chat.scores["sees_trl_completions"].tolist() == [1.0] * 4
    assert plain.scores["sees_trl_completions"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in_process", "worker"])
def test_builtin_rules_read_completions_as_messages(num_workers):
    completions = ["<think> 1 + 1 = 2 </think> <answer> 2 </answer>", "<answer> 5 </answer>"]
    with suite(["math_accuracy", "format"], num_workers) as rewards:
        result = rewards.score(CHAT, completions, {"answer": ["2", "4"]})
    assert result.scores["math_accuracy"].tolist() == [1.0, 0.0]
    assert result.scores["format"].tolist() == [1.0, 0.0]


def test_import_path_functions_get_the_whole_batch_in_a_worker_and_builtin_rules_one_completion():
    specs = [f"{CONTRACT}:batch_size", f"{CONTRACT}:share_of_longest", "format"]
    with suite(specs, num_workers=2) as rewards:
        shown = repr(rewards)
        result = rewards.score(["p"] * 4, ["a", "bb", "cccc", "dd"])
    assert "batch_size(workers, whole batch" in shown and "format(workers, per completion" in shown
    assert result.scores["batch_size"].tolist() == [4.0] * 4
    assert result.scores["share_of_longest"].tolist() == [0.25, 0.5, 1.0, 0.5]


@pytest.mark.parametrize("placement", ["in_process", "worker", "isolated"])
def test_trainer_state_and_what_a_reward_logs_reach_the_result(placement):
    reward = f"{CONTRACT}:trainer_aware"
    if placement == "isolated":
        reward = IsolatedReward(functools.partial(resolve, reward), name="trainer_aware")
    state = TrainerState(global_step=3, max_steps=10, epoch=0.25)
    try:
        with suite([reward], num_workers=int(placement == "worker")) as rewards:
            result = rewards.score(CHAT * 2, ["2", "4", "two", "four"], trainer_state=state)
    finally:
        if placement == "isolated":
            reward.close()
    assert not result.failures and result.scores["trainer_aware"].tolist() == [0.25] * 4
    assert result.extra == {"global_step": [3] * 4, "text": ["2", "4", "two", "four"]}
    assert result.logged_metrics == {"progress": 0.3, "batch_size": 4.0}


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in_process", "worker"])
def test_a_batch_that_raises_is_rescored_per_completion_and_failed_calls_log_nothing(num_workers):
    with suite([f"{CONTRACT}:logs_then_fails_on_bad"], num_workers) as rewards:
        result = rewards.score(["p"] * 3, ["a", "bad", "c"])
    assert result.scores["logs_then_fails_on_bad"].tolist() == [1.0, 0.0, 1.0]
    assert [(f.index, f.kind) for f in result.failures] == [(1, "error")]
    assert "cannot score 'bad'" in result.failures[0].message
    assert result.extra == {"seen": ["a", None, "c"]}


def test_a_batch_call_in_a_worker_is_killed_at_its_time_limit():
    with suite([f"{HOSTILE}:sleepy"], num_workers=1, call_timeout_s=1.0) as rewards:
        start = time.monotonic()
        result = rewards.score(["p"] * 3, ["a", "b", "c"], {"seconds": [10.0] * 3})
        elapsed = time.monotonic() - start
        again = rewards.score(["p"], ["a"], {"seconds": [0.0]})  # a fresh worker serves the next call
    assert elapsed < 5.0 and result.count("sleepy", "timeout") == 3
    assert result.failures[0].message == "exceeded 1.0 s; the worker was killed"
    assert again.scores["sleepy"].tolist() == [1.0]


def test_a_logged_column_of_the_wrong_length_is_left_out_with_a_warning(caplog):
    def first_only(completions, log_extra, **columns):
        log_extra("first", completions[:1])
        return [1.0] * len(completions)

    with suite([first_only], num_workers=0) as rewards:
        result = rewards.score(["p", "q"], ["a", "b"])
    assert result.extra == {} and result.scores["first_only"].tolist() == [1.0, 1.0]
    assert "logged 1 values in column 'first' for 2 completions" in caplog.text


def test_columns_named_like_the_trainers_keywords_are_refused():
    with suite(["format"], num_workers=0) as rewards, pytest.raises(ValueError, match="'trainer_state' clashes"):
        rewards.score(["p"], ["a"], {"trainer_state": [None]})
