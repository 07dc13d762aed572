"""Two CPU processes (gloo) train exactly like one process on the same global batch: data-parallel under
accelerate, and with the policy sharded by FSDP2 and expert parallelism under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo_math.py"
FLAGS = [
    "--embedded_preset", "tiny-debug", "--num_train_problems", "200", "--num_eval_problems", "4",
    "--sft_max_steps", "20", "--sft_batch_size", "8", "--max_steps", "2", "--prompts_per_step", "4",
    "--num_generations", "4", "--max_completion_length", "16", "--eval_samples_per_prompt", "1",
    "--reward_workers", "0", "--micro_batch_size", "4", "--lr_schedule", "cosine",
    "--keep_routing", "true", "--top_k", "12", "--keep_sampling_mask", "true",  # recorded on rank 0, used on both
]  # fmt: skip


def run(launcher: list[str], output_dir: Path, cache_dir: Path, *flags: str) -> list[dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(RECIPE), *FLAGS, *flags, "--output_dir", str(output_dir), "--cache_dir", str(cache_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # the training steps (not the held-out evaluations)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[dict], Path]:
    """The run on one process; returns its steps and its cache (the SFT warm start the other runs reuse)."""
    tmp = tmp_path_factory.mktemp("one")
    return run([sys.executable], tmp / "run", tmp / "cache"), tmp / "cache"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
@pytest.mark.parametrize(
    ("launcher", "flags"),
    [
        (["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517"], ()),
        (TORCHRUN, ("--fsdp", "true", "--expert_parallel", "2")),  # FSDP2, each rank half of every MoE's experts
    ],
    ids=["ddp", "fsdp2-ep2"],
)
def test_two_processes_match_one_on_the_same_global_batch(one_process, tmp_path, launcher, flags):
    one, cache = one_process
    two = run(launcher, tmp_path / "two", cache, *flags)
    assert len(one) == len(two) == 2
    first_one, first_two = one[0], two[0]
    assert first_two["reward"] == first_one["reward"]
    assert first_two["loss"] == pytest.approx(first_one["loss"], rel=1e-4, abs=1e-7)
    assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=1e-5)
    assert first_two["entropy"] == pytest.approx(first_one["entropy"], rel=1e-5)
    for key in ("completion_length/mean", "truncated_fraction"):  # the whole batch's, not rank 0's share
        assert first_two[key] == pytest.approx(first_one[key])
    assert [m["lr"] for m in two] == pytest.approx([m["lr"] for m in one])  # one schedule step per optimizer step
    # both ranks score what the sampler sampled: its experts and its top-k sets reached the second rank too
    assert max(m["mismatch/abs_logp_diff"] for m in two) < 1e-5
