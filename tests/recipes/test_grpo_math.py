"""The recipe end to end (a few steps, tiny sizes) and its one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from recipes.launch import main

SMALL = [
    "--embedded_preset", "tiny-debug", "--num_train_problems", "200", "--num_eval_problems", "6",
    "--sft_max_steps", "4", "--sft_batch_size", "8", "--max_steps", "2", "--prompts_per_step", "3",
    "--num_generations", "2", "--max_completion_length", "12", "--eval_samples_per_prompt", "1",
    "--reward_workers", "0",
]  # fmt: skip


def test_embedded_default_end_to_end(tmp_path, capsys):
    main("grpo_math", [*SMALL, "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "SFT  checkpoint:" in out and "GRPO checkpoint:" in out
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["sft"]["num_prompts"] == 6 and 0.0 <= results["grpo"]["accuracy"] <= 1.0
    assert (run / "final" / "config.json").exists() and (run / "report.png").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if (p / "config.json").exists()]

    main("grpo_math", [*SMALL, "--output_dir", str(tmp_path / "again"), "--cache_dir", str(tmp_path / "cache")])
    assert f"cached at {cached}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: no such file"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such model directory"),
        (["--reward", "no_such_module:fn"], "--reward no_such_module:fn"),
        (["--num_generations", "1"], r"num_generations \(G\) must be >= 2"),
        (["--embedded_preset", "huge"], "--embedded_preset huge: not one of"),
        (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
    ],
)
def test_bad_input_is_one_clear_line(flags, message, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main("grpo_math", [*flags, "--output_dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error: ")
    assert pytest.importorskip("re").search(message, str(exit_info.value.code))


def test_dataset_without_the_needed_columns(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1 + 1", "solution": "2"}\n')
    with pytest.raises(SystemExit, match="needs columns 'question' and 'answer'"):
        main("grpo_math", ["--dataset", str(data), "--output_dir", str(tmp_path)])
