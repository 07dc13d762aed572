"""Multi-stage recipes: the five R1 stages end to end at tiny sizes, resuming, and checked documents."""

from __future__ import annotations

import json

import pytest
import yaml

from r1kit.grpo.options import ConfigError
from r1kit.recipes.r1_pipeline import DEFAULT_RECIPE, parse_command_line
from r1kit.recipes.stages import load_recipe, parse_stages, run_stages
from r1kit.sft.rejection_sampling import load_rejection_samples

SHARED = {
    "embedded_preset": "tiny-debug", "num_train_problems": 200, "num_eval_problems": 4,
    "eval_samples_per_prompt": 1, "reward_workers": 0, "rollout": "local", "sft_max_steps": 3,
    "sft_batch_size": 8, "num_generations": 2, "prompts_per_step": 2, "max_completion_length": 12,
    "micro_batch_size": 4,
}  # fmt: skip
STAGES = [
    {"name": "cold_start", "kind": "sft"},
    {"name": "rl", "kind": "grpo", "max_steps": 1},
    {"name": "rs", "kind": "rejection_sampling", "num_prompts": 6, "samples_per_prompt": 3,
     "thresholds": {"format": 0.0}, "require_stop": False, "max_new_tokens": 12},
    {"name": "sft_on_samples", "kind": "sft", "start": "base", "data": "rs"},
    {"name": "final_rl", "kind": "grpo", "max_steps": 1},
]  # fmt: skip


def test_the_r1_stages_run_chain_and_resume(tmp_path, capsys):
    document = {**SHARED, "output_dir": str(tmp_path), "stages": STAGES}
    results = run_stages(document)
    assert [r.name for r in results] == ["cold_start", "rl", "rs", "sft_on_samples", "final_rl"]
    assert all(0.0 <= r.accuracy <= 1.0 for r in results if r.kind != "rejection_sampling")
    assert results[2].accuracy is None and results[2].summary["samples"] == 18
    kept = load_rejection_samples(results[2].output)
    assert len(kept) == results[2].summary["kept"] > 0 and set(kept.column_names) >= {"prompt", "completion"}
    # each stage starts where the recipe says: rl from cold_start, final_rl from sft_on_samples
    assert json.loads((tmp_path / "rl" / "results.json").read_text())["final_model"] == results[1].output
    assert results[1].output.startswith(str(tmp_path / "rl"))
    rl_options = yaml.safe_load((tmp_path / "rl" / "config.yaml").read_text())  # the stage alone, rerunnable
    assert rl_options["model"] == results[0].output and rl_options["sft"] == "never"
    assert (tmp_path / "rl" / "final" / "README.md").exists()
    assert results[3].output == str(tmp_path / "sft_on_samples" / "model")
    assert json.loads((tmp_path / "rs" / "provenance.json").read_text())["checkpoint"] == results[1].output
    table = capsys.readouterr().out
    assert "held-out accuracy" in table and "sft_on_samples" in table
    assert len(json.loads((tmp_path / "stages.json").read_text())) == 5

    again = run_stages(document)  # every stage finished with the same settings: all skipped
    assert again == results and capsys.readouterr().out.count("finished earlier, skipped") == 5

    changed = {**document, "stages": [*STAGES[:4], {**STAGES[4], "max_steps": 2}]}
    run_stages(changed)
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4 and "=== stage final_rl (grpo)" in out


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "non-empty 'stages'"),
        ([{"name": "a"}], "needs 'name' and 'kind'"),
        ([{"name": "a", "kind": "dpo"}], "kind must be one of"),
        ([{"name": "a", "kind": "sft"}, {"name": "a", "kind": "grpo"}], "unique"),
        ([{"name": "a", "kind": "grpo", "start": "later"}], "neither 'base' nor an earlier"),
        ([{"name": "a", "kind": "sft", "data": "a0"}], "earlier rejection_sampling stage"),
        ([{"name": "r", "kind": "rejection_sampling"}, {"name": "g", "kind": "grpo", "start": "r"}], "model stage"),
    ],
)
def test_bad_recipes_name_the_problem(stages, message):
    with pytest.raises(ConfigError, match=message):
        parse_stages({"stages": stages})


def test_unknown_settings_and_command_line(tmp_path):
    stages = [{"name": "a", "kind": "sft", "samples_per_prompt": 3}]
    document = {**SHARED, "output_dir": str(tmp_path), "stages": stages}
    with pytest.raises(ConfigError, match=r"stage 'a': unknown settings \['samples_per_prompt'\]"):
        run_stages(document)
    path, overrides = parse_command_line(["--output_dir", "runs/x", "--cpu_threads", "2"])
    assert path == DEFAULT_RECIPE and overrides == {"output_dir": "runs/x", "cpu_threads": 2}
    recipe = load_recipe(DEFAULT_RECIPE, overrides)
    _, stages = parse_stages(recipe)
    assert [s.kind for s in stages] == ["sft", "grpo", "rejection_sampling", "sft", "grpo"]
    assert stages[3].start == "base" and stages[3].data == "rejection_sampling"
    with pytest.raises(ConfigError, match="key value pairs"):
        parse_command_line(["--output_dir"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_r1_tiny_second_sft_beats_the_cold_start(tmp_path):
    """The shipped five-stage recipe on the embedded default (about 20 minutes on 2 cores)."""
    results = {r.name: r for r in run_stages(load_recipe(DEFAULT_RECIPE, {"output_dir": str(tmp_path)}))}
    assert results["reasoning_rl"].accuracy > results["cold_start"].accuracy
    assert results["sft_on_samples"].accuracy > results["cold_start"].accuracy  # its data has no slips
    assert results["rejection_sampling"].summary["kept"] > 0
