"""The recipe end to end (a few steps, tiny sizes) and its one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from r1kit.recipes.launch import run_recipe
from r1kit.recipes.pipeline import cpu_threads


@pytest.fixture
def launched_single_threaded(monkeypatch):
    """What `accelerate launch` without a config does to a CPU run: OMP_NUM_THREADS=1, one torch thread."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_embedded_default_end_to_end(tmp_path, capsys, launched_single_threaded, small_run):
    run_recipe("grpo_math", [*small_run, "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    cores = len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == cores and f"training on CPU with {cores} torch threads per process" in out
    assert "SFT  checkpoint:" in out and "GRPO checkpoint:" in out
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["sft"]["num_prompts"] == 6 and 0.0 <= results["grpo"]["accuracy"] <= 1.0
    assert (run / "final" / "config.json").exists() and (run / "report.png").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # held-out accuracy before GRPO, two steps, held-out accuracy after
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if (p / "config.json").exists()]

    run_recipe(
        "grpo_math", [*small_run, "--output_dir", str(tmp_path / "again"), "--cache_dir", str(tmp_path / "cache")]
    )
    assert f"cached at {cached}" in capsys.readouterr().out


def test_cpu_threads_share_the_cores_among_the_processes_unless_asked():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(None, 1) == cores
    assert cpu_threads(None, 2) == max(1, cores // 2)
    assert cpu_threads(None, 4 * cores) == 1
    assert cpu_threads(3, 2) == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: no such file"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such model directory"),
        (["--reward", "no_such_module:fn"], "--reward: .*no_such_module:fn"),
        (["--num_generations", "1"], r"num_generations \(G\) must be >= 2"),
        (["--embedded_preset", "huge"], "--embedded_preset huge: not one of"),
        (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
        (["--cpu_threads", "0"], "--cpu_threads must be >= 1, got 0"),
        (["--rollout_connect", "host:1"], "--rollout_connect: set R1KIT_ROLLOUT_AUTHKEY to the secret"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--num_generation", "4"], "^error: unknown option --num_generation; did you mean --num_generations\\?$"),
        (["--config", "CONFIG_WITH_A_TYPO"], "unknown option betta; did you mean beta\\?$"),
        (["--hub_model_id", "a/b/c"], "--hub_model_id 'a/b/c': expected a hub repository id"),
    ],
)
def test_bad_input_is_one_clear_line(flags, message, tmp_path, monkeypatch):
    monkeypatch.delenv("R1KIT_ROLLOUT_AUTHKEY", raising=False)
    (tmp_path / "typo.yaml").write_text("betta: 0.1\n")
    flags = [str(tmp_path / "typo.yaml") if flag == "CONFIG_WITH_A_TYPO" else flag for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_recipe("grpo_math", [*flags, "--output_dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error: ")
    assert re.search(message, str(exit_info.value.code))


def test_dataset_without_the_needed_columns(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1 + 1", "solution": "2"}\n')
    with pytest.raises(SystemExit, match=r"has columns \['problem', 'solution'\]; expected TRL's prompt"):
        run_recipe("grpo_math", ["--dataset", str(data), "--output_dir", str(tmp_path)])


GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


@pytest.mark.skipif(not GSM8K.exists(), reason="GSM8K data not beside the repository")
def test_sft_then_grpo_on_a_local_transformers_model_and_gsm8k(tmp_path, local_llama, capsys):
    model_dir = local_llama
    flags = ["--model", str(model_dir), "--dataset", str(GSM8K), "--num_eval_problems", "2", "--sft_max_steps", "2",
             "--sft_batch_size", "2", "--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2",
             "--max_completion_length", "8", "--micro_batch_size", "4", "--eval_samples_per_prompt", "1",
             "--reward_workers", "0", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    run_recipe("sft_then_grpo", flags)
    assert (tmp_path / "run" / "sft" / "config.json").exists()
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert "GRPO checkpoint:" in capsys.readouterr().out


def test_lora_run_writes_a_merged_model_and_its_adapter(tmp_path, small_run):
    run_recipe("grpo_math", [*small_run, "--lora_r", "4", "--output_dir", str(tmp_path / "run"),
                       "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    final = tmp_path / "run" / "final"
    assert (final / "config.json").exists() and (final / "adapter" / "adapter_config.json").exists()


def test_sft_and_grpo_report_to_the_same_tracker_under_the_run_name(tmp_path, small_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--report_to", "tensorboard", "--run_name", "tiny", "--log_completions_steps", "1"]
    run_recipe(
        "grpo_math", [*small_run, *flags, "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "c")]
    )
    boards = tmp_path / "run" / "tensorboard"
    assert sorted(p.name for p in boards.iterdir()) == ["tiny", "tiny-sft"]
    sft = EventAccumulator(str(boards / "tiny-sft")).Reload()
    assert "train/loss" in sft.Tags()["scalars"]
    grpo = EventAccumulator(str(boards / "tiny"), size_guidance={"tensors": 0}).Reload()
    assert [event.step for event in grpo.Scalars("eval/accuracy")] == [0, 2]  # before and after GRPO
    assert "reward" in grpo.Tags()["scalars"]
    assert "samples/text_summary" in grpo.Tags()["tensors"]  # the completions, as a table


def test_fp8_run_trains_in_fp8_and_saves_the_recipe(tmp_path, small_run):
    run_recipe(
        "grpo_math",
        [*small_run, "--fp8", "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")],
    )
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["fp8"]["block_size"] == 128
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    training = [m for m in metrics if "loss" in m]
    assert training and all(1e-4 < m["mismatch/abs_logp_diff"] < 1.0 for m in training)  # FP8 trainer, FP32 sampler


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_gives_the_same_gradients(local_llama, lora_r):
    from accelerate import Accelerator

    from r1kit.recipes.arguments import RecipeArguments
    from r1kit.recipes.pipeline import _trainable_policy

    ids = torch.randint(3, 100, (2, 12))
    gradients = []
    for checkpointing in (False, True):
        args = RecipeArguments(model=str(local_llama), lora_r=lora_r, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same LoRA initialisation
        policy = _trainable_policy(args, str(local_llama), None, Accelerator(cpu=True)).train()
        policy(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        trained = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
        assert all(g is not None for g in trained.values())
        gradients.append(trained)
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)
