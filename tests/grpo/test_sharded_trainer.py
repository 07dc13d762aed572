"""GRPO on a policy sharded with FSDP2 and expert parallelism (2 and 4 gloo processes) trains like one process
on the same global batch, and a sharded run killed after a step resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1kit.grpo.export import export_checkpoint
from r1kit.policy import load_policy

SCRIPT = Path(__file__).with_name("sharded_run.py")
COMPARED = ("reward", "kl", "grad_norm", "entropy", "lr", "completion_length/mean")


def run(output_dir: Path, *flags: str, processes: int = 1) -> list[dict]:
    """Runs sharded_run.py (under torchrun when processes > 1); returns the steps' metrics."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run([*launcher, str(SCRIPT), str(output_dir), *flags], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(actual: list[dict], expected: list[dict], actual_dir: Path, expected_dir: Path) -> None:
    assert [m["step"] for m in actual] == [m["step"] for m in expected]
    for got, want in zip(actual, expected, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), (got["step"], key)
        # the loss (about 2e-4) sums per-token terms of both signs, each about 0.1: float32 rounding of
        # reductions in another order moves it by a few 1e-8
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-7), got["step"]
    weights = [load_file(directory / "final" / "model.safetensors") for directory in (actual_dir, expected_dir)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[1].items():  # after 3 AdamW steps of lr 1e-2
        # AdamW divides each gradient element by its own running magnitude: an element whose gradient is
        # about 1e-9 (a token the batch barely touches) turns float noise of another summation order into
        # ~1e-3 of the learning rate (measured: one embedding element off by 1.02e-5, every other <= 2e-6)
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-5, atol=3e-5, msg=name)


STEPS = ("--max-steps", "3")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[dict], Path]:
    """Three steps on one process, unsharded: what every sharded run must reproduce."""
    output_dir = tmp_path_factory.mktemp("one") / "run"
    return run(output_dir, *STEPS), output_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """The same three steps on 2 processes, FSDP2 with each MoE's experts split over both, saving every step."""
    output_dir = tmp_path_factory.mktemp("two") / "run"
    return run(output_dir, *STEPS, "--ep", "2", "--save-steps", "1", processes=2), output_dir


def test_fsdp2_with_expert_parallelism_trains_like_one_process(one_process, two_ranks):
    assert_same_run(two_ranks[0], one_process[0], two_ranks[1], one_process[1])


@pytest.mark.slow  # tests/policy/test_parallelize.py covers 4 ranks (ep=4, and ep=2 x edp=2) in the default run
def test_four_ranks_with_experts_also_sharded_over_two_groups_train_like_one_process(one_process, tmp_path):
    """ep=2 on 4 processes: every expert is FSDP-sharded over 2 ranks of its expert-parallel group as well."""
    sharded = run(tmp_path, *STEPS, "--ep", "2", processes=4)
    assert_same_run(sharded, one_process[0], tmp_path, one_process[1])


def test_a_sharded_run_killed_after_a_step_resumes_exactly_and_exports(two_ranks, tmp_path):
    """Each rank's shards of the weights and of the optimizer state go into the checkpoint and come back:
    steps 2 and 3 are the uninterrupted run's. A checkpoint exports to the final model's very files."""
    uninterrupted, run_dir = two_ranks
    checkpoint = run_dir / "checkpoint-1"
    for part in ("model", "optimizer"):  # one file per rank, nothing gathered
        assert len(list((checkpoint / part).glob("*.distcp"))) == 2, part
    assert not list(checkpoint.glob("*.safetensors"))
    resumed = run(tmp_path / "resumed", *STEPS, "--ep", "2", "--resume", str(checkpoint), processes=2)
    assert_same_run(resumed, uninterrupted[1:], tmp_path / "resumed", run_dir)

    export_checkpoint(run_dir / "checkpoint-3", tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    reloaded, final_model = load_policy(tmp_path / "exported"), load_policy(run_dir / "final")
    assert reloaded.config.to_diff_dict() == final_model.config.to_diff_dict()
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_only_sharded_checkpoints_export(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no sharded weights"):
        export_checkpoint(tmp_path, tmp_path / "out")
