"""TRL's option names work with TRL's meaning; what r1kit does not support is one line naming it."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import parse_arguments
from r1kit.recipes.launch import run_recipe

# a TRL GRPO config (trl.GRPOConfig's names and values)
TRL_GRPO_YAML = {
    "loss_type": "dr_grpo", "scale_rewards": "batch", "num_generations": 2, "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2, "max_completion_length": 12, "beta": 0.0, "epsilon": 0.3,
    "learning_rate": 2.0e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.5, "max_steps": 2,
}  # fmt: skip


def test_a_trl_grpo_yaml_means_what_it_means_in_trl(tmp_path, monkeypatch):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(TRL_GRPO_YAML))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under `accelerate launch --num_processes 2`
    args, config = parse_arguments("grpo_math", ["--config", str(path)])
    # TRL: each process trains on per_device x accumulation completions per optimizer step, G per prompt
    assert (config.micro_batch_size, config.prompts_per_step) == (2, 2 * 2 * 2 // 2)
    assert (config.aggregation, config.advantage_estimator) == ("constant", "batch_std")  # tests/grpo/test_trl_parity
    assert (config.num_generations, config.max_completion_length, config.beta, config.epsilon) == (2, 12, 0.0, 0.3)
    assert (config.learning_rate, config.lr_schedule, config.warmup_steps) == (2.0e-5, "cosine", 1)
    flags = ["--importance_sampling_level", "sequence", "--loss_type", "dapo", "--scale_rewards", "none", "--bf16",
             "true", "--use_vllm", "true", "--vllm_mode", "colocate", "--log_completions", "false"]  # fmt: skip
    args, config = parse_arguments("grpo_math", ["--config", str(path), *flags])
    assert (config.objective, config.aggregation, config.advantage_estimator) == ("gspo", "token_mean", "dr_grpo")
    assert (args.dtype, args.rollout, config.log_completions_steps) == ("bfloat16", "vllm-colocated", 0)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--loss_type", "cispo", "--epsilon_high", "5.0"],
            {"objective": "cispo", "aggregation": "token_mean", "epsilon": 1.0, "epsilon_high": 4.0},
        ),
        (
            ["--loss_type", "sapo", "--sapo_temperature_neg", "2.0"],
            {"objective": "sapo", "aggregation": "sequence_mean", "sapo_temperature_neg": 2.0},
        ),
        (
            ["--use_bias_correction_kl", "true", "--off_policy_mask_threshold", "0.5"],
            {"kl_estimator": "k3_unbiased", "off_policy_mask_threshold": 0.5},
        ),
        (["--use_bias_correction_kl", "false"], {"kl_estimator": "k3"}),
        (["--vllm_importance_sampling_correction", "false"], {"importance_correction": "none"}),
        (
            ["--vllm_importance_sampling_mode", "token_truncate", "--vllm_importance_sampling_clip_max", "2.5"],
            {"importance_correction": "token_tis", "importance_cap": 2.5},
        ),
        (
            ["--vllm_importance_sampling_mode", "sequence_truncate"],
            {"importance_correction": "sequence_tis", "importance_cap": 3.0},
        ),
        (
            ["--vllm_importance_sampling_mode", "token_mask", "--vllm_importance_sampling_clip_min", "0.5"],
            {"importance_correction": "token_mis", "importance_bounds": [0.5, 3.0]},
        ),
    ],
)
def test_trl_loss_kl_and_importance_sampling_options_mean_what_they_mean_in_trl(flags, expected, monkeypatch):
    """See tests/grpo/test_loss_variants.py for the losses against TRL's (cispo's epsilons, sapo, the KL)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, config = parse_arguments("grpo_math", flags)
    assert {name: getattr(config, name) for name in expected} == expected


def test_trl_sft_names_mean_sft_in_the_sft_recipe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = ["--learning_rate", "3e-5", "--max_steps", "7", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "2", "--lr_scheduler_type", "constant_with_warmup"]  # fmt: skip
    args, _ = parse_arguments("sft", flags)
    assert (args.sft_learning_rate, args.sft_max_steps, args.sft_batch_size, args.sft_lr_schedule) == (
        3e-5, 7, 8, "constant",
    )  # fmt: skip
    grpo_args, _ = parse_arguments("grpo_math", flags)
    assert grpo_args.sft_learning_rate is None  # in a GRPO recipe they are GRPO's


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss_type", "vespo"], "loss_type 'vespo': r1kit supports bnpo, cispo, dapo, dr_grpo, grpo, sapo"),
        (["--loss_type", "cispo"], "loss_type cispo: TRL caps the ratio at epsilon_high (0.2)"),
        (["--loss_type", "sapo", "--importance_sampling_level", "sequence"], "r1kit's sapo is token-level"),
        (["--vllm_importance_sampling_correction", "true"], "vllm_importance_sampling_mode sequence_mask"),
        (
            ["--vllm_importance_sampling_mode", "token_truncate", "--vllm_importance_sampling_clip_min", "0.5"],
            "r1kit truncates weights from above only",
        ),
        (["--use_liger_kernel", "true"], "TRL option(s) r1kit does not support: --use_liger_kernel"),
        (["--num_generation", "4"], "unknown option --num_generation; did you mean --num_generations?"),
        (["--per_device_train_batch_size", "3", "--num_generations", "2"], "not a multiple of num_generations"),
        (["--resume_from_checkpoint", "out/checkpoint-5"], "resumes the newest checkpoint"),
    ],
)
def test_what_is_not_supported_is_one_line(flags, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_arguments("grpo_math", flags)


def test_an_unsupported_key_in_a_trl_yaml_names_the_file(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({**TRL_GRPO_YAML, "sync_ref_model": True}))
    with pytest.raises(SystemExit, match=f"--config {re.escape(str(path))}: TRL option.* sync_ref_model"):
        run_recipe("grpo_math", ["--config", str(path)])


def test_the_trl_yaml_runs_end_to_end(tmp_path, small_run, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({**TRL_GRPO_YAML, "per_device_train_batch_size": 3}))
    run = tmp_path / "run"
    run_recipe("grpo_math", [*small_run, "--config", str(path), "--output_dir", str(run),
                             "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    recorded = yaml.safe_load((run / "config.yaml").read_text())  # the run's record holds r1kit's names
    assert (recorded["prompts_per_step"], recorded["micro_batch_size"], recorded["aggregation"]) == (3, 3, "constant")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in steps) == 2
