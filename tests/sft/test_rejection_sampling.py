"""Rejection sampling with the real torch engine and a reward that accepts a known subset."""

import json

import pytest

from r1kit.grpo.data import encode_prompt
from r1kit.grpo.options import ConfigError
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rollout.torch_engine import TorchRolloutEngine
from r1kit.sft.rejection_sampling import (
    RejectionSamplingConfig,
    load_rejection_samples,
    rejection_sample,
    select_completions,
    sft_row,
)


def even_length(completions, **columns):
    """1.0 for completions of an even number of characters: a known, arbitrary subset."""
    return [float(len(c) % 2 == 0) for c in completions]


def is_long(completions, **columns):
    return [float(len(c) >= 12) for c in completions]


CONFIG = RejectionSamplingConfig(
    samples_per_prompt=6, max_kept_per_prompt=3, thresholds={"even_length": 1.0, "is_long": 1.0},
    require_stop=False, max_new_tokens=10, seed=5, prompts_per_batch=2, rows_per_shard=4,
)  # fmt: skip


@pytest.fixture
def prompts():
    return arithmetic_dataset(6, seed=3).remove_columns("completion")


@pytest.fixture
def engine(debug_policy, arithmetic_tokenizer):
    return TorchRolloutEngine(debug_policy, arithmetic_tokenizer)


@pytest.fixture
def suite():
    with RewardSuite([even_length, is_long], config=RewardSuiteConfig(num_workers=0)) as suite:
        yield suite


def expected_rows(engine, tokenizer, prompts, config):
    """The rows the filter must keep, recomputed from the same samples (same batches, same seed)."""
    rows = []
    params = config.sampling_params((tokenizer.eos_token_id,))
    for start in range(0, len(prompts), config.prompts_per_batch):
        batch_prompts = prompts[start : start + config.prompts_per_batch]
        texts = engine.generate([encode_prompt(tokenizer, p) for p in batch_prompts["prompt"]], params).completion_text
        k = config.samples_per_prompt
        for i, prompt in enumerate(batch_prompts["prompt"]):
            mine = texts[i * k : (i + 1) * k]
            accepted = [len(t) % 2 == 0 and len(t) >= 12 for t in mine]
            rows += [sft_row(prompt, mine[j], {"answer": batch_prompts["answer"][i]})
                     for j in select_completions(mine, accepted, config.max_kept_per_prompt)]  # fmt: skip
    return rows


def test_keeps_exactly_the_completions_every_reward_accepts(engine, arithmetic_tokenizer, prompts, suite, tmp_path):
    stats = rejection_sample(engine, arithmetic_tokenizer, prompts, suite, CONFIG, tmp_path, checkpoint="ckpt",
                             progress=False)  # fmt: skip
    kept = load_rejection_samples(tmp_path).to_list()
    expected = expected_rows(engine, arithmetic_tokenizer, prompts, CONFIG)
    assert kept == expected and 0 < len(kept) < len(prompts) * CONFIG.max_kept_per_prompt
    assert all(len(row["completion"]) % 2 == 0 and len(row["completion"]) >= 12 for row in kept)
    assert stats.samples == 36 and stats.kept == len(kept) and stats.prompts == 6
    assert stats.acceptance_rate() <= min(stats.acceptance_rate("even_length"), stats.acceptance_rate("is_long"))
    summary = json.loads((tmp_path / "stats.json").read_text())
    assert summary["kept"] == len(kept) and sum(summary["kept_per_prompt"].values()) == 6
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["checkpoint"] == "ckpt" and provenance["thresholds"] == {"even_length": 1.0, "is_long": 1.0}
    assert provenance["config"]["samples_per_prompt"] == 6 and provenance["rewards"] == ["even_length", "is_long"]
    shards = sorted(p.name for p in tmp_path.glob("shard-*.jsonl"))
    assert len(shards) == -(-len(kept) // CONFIG.rows_per_shard)


class FailingEngine(TorchRolloutEngine):
    """The torch engine, stopped by an error on its `fail_on`-th call: a run that dies midway."""

    def __init__(self, *args, fail_on, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.fail_on = 0, fail_on

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("worker lost")
        return super().generate(*args, **kwargs)


def test_a_stopped_run_resumes_to_the_same_output(engine, debug_policy, arithmetic_tokenizer, prompts, suite, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    rejection_sample(engine, arithmetic_tokenizer, prompts, suite, CONFIG, whole, progress=False)
    failing = FailingEngine(debug_policy, arithmetic_tokenizer, fail_on=3)
    with pytest.raises(RuntimeError, match="worker lost"):
        rejection_sample(failing, arithmetic_tokenizer, prompts, suite, CONFIG, resumed, progress=False)
    assert json.loads((resumed / "progress.json").read_text())["prompts_done"] == 4
    with open(sorted(resumed.glob("shard-*.jsonl"))[-1], "a") as shard:  # a row written after the last record
        shard.write(json.dumps({"prompt": "stray", "completion": "row"}) + "\n")
    rejection_sample(engine, arithmetic_tokenizer, prompts, suite, CONFIG, resumed, progress=False)
    assert load_rejection_samples(resumed).to_list() == load_rejection_samples(whole).to_list()
    assert json.loads((resumed / "stats.json").read_text()) == json.loads((whole / "stats.json").read_text())
    other = RejectionSamplingConfig(**{**CONFIG.__dict__, "samples_per_prompt": 4})
    with pytest.raises(ConfigError, match="other settings"):
        rejection_sample(engine, arithmetic_tokenizer, prompts, suite, other, resumed, progress=False)


def test_length_capped_completions_are_rejected_by_default(engine, arithmetic_tokenizer, prompts, suite, tmp_path):
    config = RejectionSamplingConfig(**{**CONFIG.__dict__, "require_stop": True, "max_new_tokens": 2})
    stats = rejection_sample(engine, arithmetic_tokenizer, prompts, suite, config, tmp_path, progress=False)
    assert stats.kept == 0 and stats.prompts_without_kept == 6  # 2 tokens never reach the stop token here


def test_rows_follow_trl_formats():
    assert sft_row("Q: 1+1?", "2", {"answer": "2"}) == {"prompt": "Q: 1+1?", "completion": "2", "answer": "2"}
    chat = [{"role": "user", "content": "1+1?"}]
    assert sft_row(chat, "2", {}) == {"messages": [*chat, {"role": "assistant", "content": "2"}]}
    assert select_completions(["a", " a ", "b", "c"], [True, True, True, True], max_kept=2) == [0, 2]


def test_bad_settings_name_the_problem(engine, arithmetic_tokenizer, prompts, suite, tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        RejectionSamplingConfig(samples_per_prompt=0)
    with pytest.raises(ConfigError, match="at least one reward threshold"):
        RejectionSamplingConfig(thresholds={})
    missing = RejectionSamplingConfig(thresholds={"math_accuracy": 1.0}, max_new_tokens=2)
    with pytest.raises(ConfigError, match="math_accuracy"):
        rejection_sample(engine, arithmetic_tokenizer, prompts, suite, missing, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="'question'"):
        rejection_sample(engine, arithmetic_tokenizer, prompts.rename_column("prompt", "question"), suite, CONFIG,
                         tmp_path / "q", progress=False)  # fmt: skip
