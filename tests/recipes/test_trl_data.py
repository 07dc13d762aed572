"""A tiny instruct model (Llama or Qwen2 style, ChatML template) trains from the command line on TRL-format data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from r1kit.grpo.options import ConfigError
from r1kit.recipes.launch import run_recipe
from r1kit.recipes.prompts import R1_SYSTEM_PROMPT, format_prompts
from r1kit.recipes.sft import main as sft_main
from r1kit.recipes.tasks.trl_formats import load_trl_dataset, split_conversation, to_training_rows

# a GRPO run that takes seconds: no SFT, one step, sampled in the training process
TINY_GRPO = ["--sft", "never", "--num_eval_problems", "2", "--max_steps", "1", "--prompts_per_step", "2",
             "--num_generations", "2", "--max_completion_length", "8", "--micro_batch_size", "4",
             "--eval_samples_per_prompt", "1", "--reward_workers", "0", "--rollout", "local"]  # fmt: skip
QUESTIONS = [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 4) for b in range(1, 4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_on_a_conversational_prompt_only_jsonl(tmp_path, chat_model):
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in QUESTIONS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "run"
    reward = "tests.rewards.contract_rewards:sees_trl_completions"
    run_recipe("grpo_math", ["--model", str(chat_model), "--dataset", str(data), *TINY_GRPO, "--output_dir", str(run),
                             "--reward", "math_accuracy", reward, "--system_prompt", "r1"])  # fmt: skip
    step = next(m for m in metrics(run) if "rewards/sees_trl_completions/mean" in m)
    assert step["rewards/sees_trl_completions/mean"] == 1.0  # completions reached the reward as messages
    assert (run / "final" / "config.json").exists()


def test_grpo_in_bfloat16_on_a_standard_prompt_only_dataset_with_extra_columns(tmp_path, chat_model):
    rows = [{"prompt": q, "solution": a, "difficulty": len(q)} for q, a in QUESTIONS]
    data = write_jsonl(tmp_path / "plain.jsonl", rows)
    run = tmp_path / "run"
    run_recipe("grpo_math", ["--model", str(chat_model), "--dataset", str(data), *TINY_GRPO, "--output_dir", str(run),
                             "--bf16", "true",  # TRL's name for --dtype bfloat16, on CPU
                             "--reward", "tests.rewards.contract_rewards:sees_extra_columns",
                             "--accuracy_reward", "tests.rewards.contract_rewards:sees_extra_columns"])  # fmt: skip
    step = next(m for m in metrics(run) if "rewards/sees_extra_columns/mean" in m)
    assert step["rewards/sees_extra_columns/mean"] == 1.0
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("packing", ["false", "true"])
def test_sft_on_a_prompt_completion_file(tmp_path, chat_model, capsys, packing):
    rows = [{"prompt": q, "completion": f"<think> add </think> <answer> {a} </answer>", "answer": a}
            for q, a in QUESTIONS]  # fmt: skip
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    run = tmp_path / "run"
    sft_main(["--model", str(chat_model), "--dataset", str(data), "--sft", "always", "--sft_max_steps", "2",
                       "--sft_batch_size", "4", "--num_eval_problems", "2", "--eval_samples_per_prompt", "1",
              "--max_completion_length", "8", "--reward_workers", "0", "--rollout", "local",
              "--sft_packing", packing, "--sft_max_length", "96", "--output_dir", str(run)])  # fmt: skip
    assert (run / "final" / "config.json").exists()
    assert "Held-out accuracy" in capsys.readouterr().out


def test_every_trl_format_becomes_prompt_rows():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                    {"role": "assistant", "content": "2"}]  # fmt: skip
    rows = to_training_rows(Dataset.from_list([{"messages": conversation, "answer": "2"}]))
    assert rows[0]["prompt"] == conversation[:2] and rows[0]["completion"] == conversation[2:]
    assert rows[0]["answer"] == "2"
    gsm8k = to_training_rows(Dataset.from_list([{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]))
    assert gsm8k[0]["completion"].endswith("<answer> 2 </answer>")
    with pytest.raises(ConfigError, match="ending with an assistant turn"):
        split_conversation({"messages": conversation[:2]})
    with pytest.raises(ConfigError, match="rename_columns"):
        to_training_rows(Dataset.from_list([{"problem": "1 + 1", "solution": "2"}]))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_with_renamed_columns_and_a_held_out_split(tmp_path, suffix):
    table = Dataset.from_list([{"problem": q, "solution": a} for q, a in QUESTIONS])
    path = tmp_path / f"data{suffix}"
    {".jsonl": lambda: table.to_json(path), ".json": lambda: table.to_json(path, lines=False),
     ".parquet": lambda: table.to_parquet(path), ".csv": lambda: table.to_csv(path)}[suffix]()  # fmt: skip
    train, held_out = load_trl_dataset(str(path), renames=["problem=prompt"], num_eval=3)
    assert (len(train), len(held_out)) == (len(QUESTIONS) - 3, 3)
    assert set(train.column_names) == {"prompt", "solution"}
    assert not set(train["prompt"]) & set(held_out["prompt"])


def test_a_directory_with_a_test_split_and_bad_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without the hub, without retries
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "answer": a} for q, a in QUESTIONS])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "What is 9 + 9?", "answer": "18"}])
    train, held_out = load_trl_dataset(str(tmp_path), num_eval=5)
    assert len(train) == len(QUESTIONS) and held_out["prompt"] == ["What is 9 + 9?"]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_trl_dataset(str(tmp_path), train_split="dev")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_trl_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="could not load it"):  # a hub id, offline here
        load_trl_dataset("no-such-owner/no-such-dataset")


def test_prompt_formats_follow_the_chat_template_mode():
    plain = Dataset.from_list([{"prompt": "1 + 1?", "completion": "2"}])
    wrapped = format_prompts(plain, "auto", "r1", has_chat_template=True)[0]
    assert wrapped["prompt"] == [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": "1 + 1?"}]
    assert wrapped["completion"] == [{"role": "assistant", "content": "2"}]
    assert format_prompts(plain, "auto", None, has_chat_template=False)[0]["prompt"] == "1 + 1?"
    assert format_prompts(plain, "never", "Be brief.", has_chat_template=True)[0]["prompt"] == "Be brief.\n\n1 + 1?"
    with pytest.raises(ConfigError, match="no chat template"):
        format_prompts(plain, "always", None, has_chat_template=False)
    chat = Dataset.from_list([{"prompt": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "?"}]}])
    assert format_prompts(chat, "never", "r1", has_chat_template=True)[0]["prompt"][0]["content"] == "Mine."
    with pytest.raises(ConfigError, match="conversational"):
        format_prompts(chat, "auto", None, has_chat_template=False)
