"""Reward model: batched scoring equals one-by-one scoring; loading from a directory; its own process."""

import functools

import pytest
import torch

from r1kit.rewards import IsolatedReward, RewardSuite, RewardSuiteConfig, resolve
from r1kit.rewards.models import RewardModelReward
from tests.rewards.tiny_models import (
    reward_model_from_directory,
    save_tiny_reward_model,
    tiny_reward_model,
    word_tokenizer,
)

PROMPTS = ["the question is 12 7", "the question", "12 7 2", "the answer"]
COMPLETIONS = ["the answer is 38", "19", "the answer is 39 the answer is 39 the answer is 39", "38 38"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"))


def test_batched_scores_equal_one_by_one_forward():
    tokenizer = word_tokenizer()
    model = tiny_reward_model(tokenizer)
    reward = RewardModelReward(model, tokenizer, batch_size=3, use_chat_template=False, device="cpu")
    scores = reward(COMPLETIONS, prompts=PROMPTS)
    with torch.no_grad():
        expected = [
            model(torch.tensor([tokenizer(p + c)["input_ids"]])).logits[0, 0].item()
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)  # the model does tell the texts apart
    squashed = RewardModelReward(model, tokenizer, use_chat_template=False, sigmoid=True)(COMPLETIONS, prompts=PROMPTS)
    assert all(0 < s < 1 for s in squashed)


def test_loads_from_a_directory_and_runs_batched_in_the_suite(saved_model):
    reward = RewardModelReward(str(saved_model), batch_size=2, use_chat_template=False)
    direct = reward(COMPLETIONS, prompts=PROMPTS)
    with RewardSuite([reward, "math_accuracy"], config=RewardSuiteConfig(num_workers=1)) as suite:
        assert "reward_model(in-process" in repr(suite)
        result = suite.score(PROMPTS, COMPLETIONS, {"answer": ["38"] * 4})
    assert result.scores["reward_model"].tolist() == pytest.approx(direct, abs=1e-6)
    assert result.scores["math_accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_reward_model_in_its_own_process(saved_model):
    in_process = RewardModelReward(str(saved_model), batch_size=2, use_chat_template=False)
    isolated = IsolatedReward(functools.partial(reward_model_from_directory, str(saved_model)), name="rm")
    try:
        scores = isolated(COMPLETIONS, prompts=PROMPTS)
    finally:
        isolated.close()
    assert scores == pytest.approx(in_process(COMPLETIONS, prompts=PROMPTS), abs=1e-5)


def test_isolated_reward_is_killed_at_its_time_limit_and_restarts():
    sleepy = IsolatedReward(functools.partial(resolve, "tests.rewards.hostile_rewards:sleepy"), timeout_s=0.5)
    try:
        with pytest.raises(TimeoutError, match="exceeded its time limit"):
            sleepy(["a"], prompts=["p"], seconds=[30.0])
        assert sleepy(["a"], prompts=["p"], seconds=[0.0]) == [1.0]  # served by a fresh process
    finally:
        sleepy.close()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        RewardModelReward(tiny_reward_model(word_tokenizer()))
    with pytest.raises(TypeError, match="cannot be pickled"):
        IsolatedReward(lambda: None)


@pytest.mark.gpu
def test_reward_model_on_its_own_cuda_device_matches_cpu():
    tokenizer = word_tokenizer()
    model = tiny_reward_model(tokenizer)
    cpu = RewardModelReward(model, tokenizer, use_chat_template=False, device="cpu")(COMPLETIONS, prompts=PROMPTS)
    gpu_reward = RewardModelReward(model, tokenizer, batch_size=3, use_chat_template=False, device="cuda")
    assert gpu_reward.device.type == "cuda"
    assert gpu_reward(COMPLETIONS, prompts=PROMPTS) == pytest.approx(cpu, abs=1e-4)
