"""The GRPO step calls its rewards under TRL's contract, and what they log reaches the step's metrics and samples.

A scripted engine (no model) answers conversational prompts, so the collector
and the held-out evaluation are tested on exactly what reaches the rewards; the
last test runs the whole trainer and reads metrics.jsonl and samples.jsonl.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from r1kit.grpo.collector import RolloutCollector
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.data import PromptSampler
from r1kit.grpo.evaluation import evaluate
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rollout.engine import RolloutBatch, SamplingParams
from tests.rewards.contract_rewards import trainer_aware

CONTRACT = "tests.rewards.contract_rewards"
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ANSWERS = ["<think> 1 + 1 = 2 </think> <answer> 2 </answer>", "<answer> 3 </answer>"]


class ScriptedEngine:
    """A rollout engine that answers every prompt with the same scripted completions, in turn."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        texts = [self.texts[k % len(self.texts)] for k in range(len(prompts) * params.n)]
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return RolloutBatch(
            prompt_ids=[list(prompt) for prompt in prompts for _ in range(params.n)],
            completion_ids=ids,
            completion_text=texts,
            sampler_logprobs=[torch.zeros(len(row)) for row in ids],
            finish_reason=["stop"] * len(ids),
            policy_version=0,
        )


@pytest.fixture
def chat_tokenizer(arithmetic_tokenizer):
    tokenizer = copy.deepcopy(arithmetic_tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture
def chat_rows() -> Dataset:
    """Conversational prompts with an answer, an extra column, and a "completion" column TRL does not pass."""
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{a} + 1?"}], "answer": str(a + 1), "level": a, "completion": "x"}
            for a in range(8)
        ]
    )


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in_process", "worker"])
def test_the_collector_calls_rewards_as_trl_does_and_routes_their_logs(chat_tokenizer, chat_rows, num_workers):
    config = GRPOConfig(num_generations=2, prompts_per_step=2, max_steps=5, num_iterations=2, log_completions_steps=1)
    specs = [f"{CONTRACT}:sees_trl_completions", f"{CONTRACT}:trainer_aware", f"{CONTRACT}:keyword_names", "format"]
    sampler = PromptSampler(chat_rows, config.prompts_per_step, seed=0)
    sampler.load_state_dict({"epoch": 1, "position": 2})
    with RewardSuite(specs, config=RewardSuiteConfig(num_workers=num_workers)) as rewards:
        collector = RolloutCollector(config, ScriptedEngine(chat_tokenizer, ANSWERS), rewards, chat_tokenizer,
                                     sampler, "prompt", accuracy_reward=None)  # fmt: skip
        scored = collector.collect(step=2)
    metrics, samples = scored.metrics, scored.samples
    assert metrics["rewards/sees_trl_completions/mean"] == 1.0 and metrics["rewards/format/mean"] == 0.5
    # TrainerState counts optimizer updates: 2 GRPO steps of num_iterations = 2 done, of 5 * 2
    assert metrics["progress"] == pytest.approx(0.4) and metrics["batch_size"] == 4.0
    assert metrics["rewards/trainer_aware/mean"] == pytest.approx(1 + 2 / 8)  # epochs done when the batch was drawn
    assert [sample["global_step"] for sample in samples] == [4] * 4
    assert [sample["text"] for sample in samples] == [sample["completion"] for sample in samples]
    assert samples[0]["keywords"] == "answer completion_ids level log_extra log_metric prompts trainer_state"


def test_held_out_evaluation_scores_conversational_prompts_as_training_does(chat_tokenizer, chat_rows):
    seen = {}

    def scorer(prompts, completions, columns):
        seen.update(columns)
        return rewards.score(prompts, completions, columns).scores["sees_trl_completions"].tolist()

    with RewardSuite([f"{CONTRACT}:sees_trl_completions"], config=RewardSuiteConfig(num_workers=0)) as rewards:
        result = evaluate(ScriptedEngine(chat_tokenizer, ANSWERS), chat_tokenizer, chat_rows, scorer,
                          SamplingParams(n=2, max_new_tokens=8))  # fmt: skip
    assert result.accuracy == 1.0 and result.num_prompts == 8
    assert sorted(seen) == ["answer", "completion_ids", "level"]
    assert seen["completion_ids"][0] == chat_tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]


def test_logged_metrics_and_columns_reach_metrics_jsonl_and_samples_jsonl(make_trainer):
    trainer = make_trainer(max_steps=2, log_completions_steps=1)
    with RewardSuite([trainer_aware], config=RewardSuiteConfig(num_workers=0)) as rewards:
        trainer.collector.rewards = rewards
        trainer.train()
    run = Path(trainer.config.output_dir)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["progress"], m["batch_size"]) for m in metrics] == [(1, 0.0, 16.0), (2, 0.5, 16.0)]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["global_step"] for s in samples] == [0] * 16 + [1] * 16
    assert all(s["text"] == s["completion"] for s in samples)
