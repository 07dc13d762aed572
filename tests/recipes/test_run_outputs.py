"""A finished run stands on its own: config, versions, model card and report in final/, rerunnable and pushable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from r1kit.recipes.hub import upload_operations
from r1kit.recipes.launch import run_recipe

TIMING = ("time/", "tokens_per_second")


def _first_step(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1)
    return {k: v for k, v in first.items() if not k.startswith(TIMING)}


def test_a_finished_run_stands_on_its_own_reruns_from_its_config_and_pushes_final(tmp_path, monkeypatch, small_run):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run_recipe("grpo_math", [*small_run, "--output_dir", str(run), "--cache_dir", str(tmp_path / "cache")])
    final = run / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "deepseek_v3"

    config_text = (final / "config.yaml").read_text()
    assert re.search(r"^# software: r1kit \S+, torch \S+, transformers \S+", config_text, re.MULTILINE)
    options = yaml.safe_load(config_text)
    assert options["max_steps"] == 2 and options["output_dir"] == str(run) and options["run_name"] == "run"
    results = json.loads((final / "results.json").read_text())
    assert results["environment"]["torch"] and results["recipe"] == "grpo_math"
    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for expected in (
        "embedded tiny DeepSeek-V3",
        "arithmetic word problems",
        "`math_accuracy` x 1.0",
        "| steps | 2 |",
        "| SFT |",
        "| GRPO |",
        "![training report](report.png)",
        "r1kit grpo --config config.yaml",
    ):
        assert expected in card, expected  # fmt: skip
    assert (final / "report.png").exists()
    uploaded = [op.path_in_repo for op in upload_operations(final)]
    assert uploaded == sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = tmp_path / "again"
    with pytest.raises(SystemExit) as exit_info:
        run_recipe("grpo_math", ["--config", str(run / "config.yaml"), "--output_dir", str(again),
                                 "--push_to_hub", "--hub_model_id", "someone/tiny-r1"])  # fmt: skip
    message = str(exit_info.value.code)
    assert "\n" not in message
    assert re.match(
        rf"error: --push_to_hub: could not push {again / 'final'} to someone/tiny-r1 on the hub at ", message
    )
    assert (again / "final" / "README.md").exists()  # everything was saved before the push
    assert _first_step(again) == _first_step(run)


def test_sft_then_grpo_resume_skips_the_finished_sft(tmp_path, local_llama, capsys):
    model_dir = local_llama
    flags = ["--model", str(model_dir), "--dataset", "arithmetic", "--num_train_problems", "64",
             "--num_eval_problems", "2", "--sft_max_steps", "2", "--sft_batch_size", "2", "--prompts_per_step", "2",
             "--num_generations", "2", "--max_completion_length", "8", "--micro_batch_size", "4",
             "--eval_samples_per_prompt", "1", "--reward_workers", "0", "--rollout", "local", "--save_steps", "1",
             "--output_dir", str(tmp_path / "run")]  # fmt: skip
    run_recipe("sft_then_grpo", [*flags, "--max_steps", "1"])
    sft_weights = tmp_path / "run" / "sft" / "model.safetensors"
    written = sft_weights.stat().st_mtime_ns
    capsys.readouterr()

    run_recipe("sft_then_grpo", [*flags, "--max_steps", "2", "--resume"])
    out = capsys.readouterr().out
    assert "SFT warm start: finished earlier, skipped" in out and "resumed from" in out and "at step 1" in out
    assert sft_weights.stat().st_mtime_ns == written  # the KL reference and start checkpoint are untouched

    with pytest.raises(SystemExit, match=r"--resume: the SFT stage in .* ran with other settings"):
        run_recipe("sft_then_grpo", [*flags, "--max_steps", "3", "--resume", "--sft_max_steps", "3"])


def test_sft_alone_then_eval_of_its_checkpoint_agree(tmp_path, capsys):
    from r1kit.recipes import evaluate, sft

    task = ["--embedded_preset", "tiny-debug", "--num_train_problems", "200", "--num_eval_problems", "4",
            "--eval_samples_per_prompt", "2", "--max_completion_length", "12", "--reward_workers", "0",
            "--rollout", "local"]  # fmt: skip
    sft.main([*task, "--sft_max_steps", "4", "--sft_batch_size", "8", "--output_dir", str(tmp_path / "sft")])
    final = tmp_path / "sft" / "final"
    assert "supervised fine-tuning on worked solutions" in (final / "README.md").read_text()
    assert yaml.safe_load((final / "config.yaml").read_text())["sft_max_steps"] == 4
    trained = json.loads((final / "results.json").read_text())["sft"]

    evaluate.main([*task, "--model", str(final), "--output_dir", str(tmp_path / "eval")])
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["accuracy"] == trained["accuracy"] and scored["num_prompts"] == 4  # same problems, same samples
    assert f"{final}: held-out accuracy" in capsys.readouterr().out


def test_the_commit_is_r1kits_own_or_none(tmp_path):
    import subprocess

    from r1kit.recipes.run_record import git_commit

    project = tmp_path / "project"  # someone else's repository, with r1kit installed in a venv inside it
    installed = project / ".venv" / "site-packages" / "r1kit"
    installed.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    assert git_commit(installed) is None
    assert git_commit(tmp_path / "elsewhere") is None
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit(root))


def test_the_model_card_of_a_hub_model_on_gsm8k_names_both_in_its_metadata():
    from r1kit.grpo.config import GRPOConfig
    from r1kit.recipes.arguments import RecipeArguments
    from r1kit.recipes.model_card import model_card
    from r1kit.recipes.run_record import resolved_options

    args = RecipeArguments(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="gsm8k", run_name="qwen-gsm8k")
    options = resolved_options(args, GRPOConfig(epsilon_high=0.28, max_steps=500))
    start = {"accuracy": 0.25, "mean_completion_length": 180.0, "num_prompts": 200, "samples_per_prompt": 1}
    card = model_card("grpo_math", options, {"start": start}, {"torch": "2.13.0", "git_commit": None}, "r1kit grpo")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and metadata["datasets"] == ["openai/gsm8k"]
    assert "recipe: GRPO (group-relative" in card and "warm start" not in card  # no SFT for a given model
    assert "200 problems, 1 sample each" in card and "| start | 25.0% | 180.0 |" in card
    assert "| clip epsilon (low / high) | 0.2 / 0.28 |" in card and "report" not in card
