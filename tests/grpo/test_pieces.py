"""Batch layout, prompt order, checkpoints, group selection, the PNG report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset

from r1kit.grpo.batch import build_policy_batch
from r1kit.grpo.checkpoint import list_checkpoints, save_model_atomic
from r1kit.grpo.collector import select_groups
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.data import (
    PromptSampler,
    check_prompt_dataset,
    checkpoint_stop_token_ids,
    encode_prompt,
    stop_token_ids,
)
from r1kit.grpo.options import ConfigError
from r1kit.grpo.plotting import plot_run, report_panels
from r1kit.rollout.engine import RolloutBatch, concat_rollouts


def rollout(prompts, completions, reasons=None, version=0) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        completion_text=["x"] * len(completions),
        sampler_logprobs=[-torch.arange(1.0, len(c) + 1) for c in completions],
        finish_reason=reasons or ["stop"] * len(completions),
        policy_version=version,
    )


def test_policy_batch_layout():
    batch = build_policy_batch(rollout([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], ["stop", "length"]), pad_token_id=0)
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.sampler_logprobs.tolist() == [[-1, -2, 0], [-1, -2, -3]]
    assert batch.truncated.tolist() == [False, True]
    first = batch.rows(slice(0, 1))  # trimmed to its own longest completion
    assert first.input_ids.tolist() == [[5, 6, 7, 1, 2]] and first.completion_mask.shape == (1, 2)


def test_prompt_sampler_covers_each_pass_and_resumes_exactly():
    data = Dataset.from_dict({"prompt": [str(i) for i in range(10)]})
    sampler = PromptSampler(data, batch_size=4, seed=3)
    seen = [row["prompt"] for _ in range(5) for row in sampler.next_batch()]
    assert sorted(seen[:10]) == sorted(map(str, range(10))) and sorted(seen[10:20]) == sorted(map(str, range(10)))
    sampler = PromptSampler(data, batch_size=4, seed=3)
    sampler.next_batch(), sampler.next_batch(), sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    resumed = PromptSampler(data, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == expected


def test_prompt_data_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['prompt'\]"):
        check_prompt_dataset(Dataset.from_dict({"question": ["q"]}), "prompt")
    with pytest.raises(ConfigError, match="exceeds the dataset's 1 rows"):
        PromptSampler(Dataset.from_dict({"prompt": ["q"]}), batch_size=2, seed=0)


def test_prompts_encode_to_token_ids_as_text_or_chat_messages(arithmetic_tokenizer):
    tokenizer = copy.deepcopy(arithmetic_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question: 2 + 3?"}]
    ids = encode_prompt(tokenizer, messages)
    rendered = "system: Be brief.\nuser: Question: 2 + 3?\nassistant:"
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert encode_prompt(tokenizer, "Question: 2 + 3?\n") == tokenizer("Question: 2 + 3?\n")["input_ids"]


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"num_generations \(G\) must be >= 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="unknown aggregation 'median'"):
        GRPOConfig(aggregation="median")
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        GRPOConfig(dynamic_sampling="sometimes")


def test_select_and_concat_groups():
    batch = rollout([[1]] * 2 + [[2]] * 2 + [[3]] * 2, [[10], [11], [20], [21], [30], [31]], version=4)
    picked = select_groups(batch, [2, 0], group_size=2)
    assert picked.completion_ids == [[30], [31], [10], [11]] and picked.policy_version == 4
    joined = concat_rollouts([picked, rollout([[9]], [[90]], version=3)])
    assert len(joined) == 5 and joined.policy_version == 3


def test_atomic_save_replaces_and_never_leaves_partial_directories(tmp_path, debug_policy, arithmetic_tokenizer):
    target = tmp_path / "checkpoint-7"
    save_model_atomic(debug_policy, arithmetic_tokenizer, target, {"step": 7})
    save_model_atomic(debug_policy, arithmetic_tokenizer, target, {"step": 7})  # overwrite in place
    assert (target / "config.json").exists() and (target / "training_state.pt").exists()

    class Exploding(torch.nn.Module):
        def save_pretrained(self, path):
            (path / "half-written").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_atomic(Exploding(), arithmetic_tokenizer, tmp_path / "checkpoint-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert list_checkpoints(tmp_path) == [target]


def test_report_png_has_a_panel_per_metric(tmp_path):
    lines = [
        {
            "step": s,
            "reward": s / 10,
            "accuracy": s / 20,
            "kl": 0.01 * s,
            "completion_length/mean": 20.0,
            "rewards/format/mean": 1.0,
            "rewards/format/errors": 0.0,
            "eval/accuracy": math.nan if s % 5 else 0.5,
        }
        for s in range(1, 31)
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({k: (None if v != v else v) for k, v in r.items()}) + "\n" for r in lines))
    png = plot_run(path, tmp_path / "report.png", title="run: model on data", held_out={"SFT": (0, 0.3)})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_the_report_draws_only_quantities_that_vary():
    records = [{"step": s, "reward": s / 10, "clip/high": 0.0, "clip/low": 0.0, "entropy": 1.5} for s in range(1, 5)]
    assert [title for title, _ in report_panels(records)] == ["reward (mean over completions)"]
    held_out = report_panels(records, with_accuracy=True)
    assert [title for title, _ in held_out] == ["reward (mean over completions)", "accuracy"]
    one_step = [{"step": 1, "reward": 0.5, "entropy": 1.5}]  # nothing varies: keep what there is
    assert len(report_panels(one_step)) == 2


def test_completions_end_at_every_eos_id_of_the_generation_config(arithmetic_tokenizer, tmp_path):
    from transformers import GenerationConfig

    eos = arithmetic_tokenizer.eos_token_id
    assert stop_token_ids(arithmetic_tokenizer) == (eos,)
    chat = GenerationConfig(eos_token_id=[eos + 1, eos, eos + 2])  # a chat model's end-of-turn ids, as Qwen's list them
    assert stop_token_ids(arithmetic_tokenizer, chat) == (eos, eos + 1, eos + 2)
    assert stop_token_ids(arithmetic_tokenizer, GenerationConfig(eos_token_id=eos + 5)) == (eos, eos + 5)
    chat.save_pretrained(tmp_path)
    assert checkpoint_stop_token_ids(arithmetic_tokenizer, str(tmp_path)) == (eos, eos + 1, eos + 2)
    assert checkpoint_stop_token_ids(arithmetic_tokenizer, str(tmp_path / "no-generation-config")) == (eos,)


def test_completions_end_at_the_configured_stop_strings(make_trainer, arithmetic_tokenizer):
    free = make_trainer(max_completion_length=16).collector.collect(0).rollout
    stop = next(ch for ch in "eoatn" if sum(ch in text for text in free.completion_text) >= 2)  # some rows emit it
    rollout = make_trainer(max_completion_length=16, stop_strings=[stop]).collector.collect(0).rollout
    stopped = [ids for ids, text in zip(rollout.completion_ids, rollout.completion_text, strict=True) if stop in text]
    assert stopped, "no completion reached the stop string"
    for ids in rollout.completion_ids:  # nothing is sampled after the token that completes it
        assert stop not in arithmetic_tokenizer.decode(ids[:-1], skip_special_tokens=True)
