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
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[dict], Path]:
    """Two steps on one process, unsharded: what every sharded run must reproduce."""
    output_dir = tmp_path_factory.mktemp("one") / "run"
    return run(output_dir), output_dir


@pytest.mark.parametrize(("processes", "ep"), [(2, 2), (4, 2)])
def test_fsdp2_with_expert_parallelism_trains_like_one_process(one_process, tmp_path, processes, ep):
    """4 processes with ep=2 shard every expert over 2 ranks of its expert-parallel group as well."""
    expected, expected_dir = one_process
    sharded = run(tmp_path, "--ep", str(ep), processes=processes)
    assert_same_run(sharded, expected, tmp_path, expected_dir)


def test_a_sharded_run_killed_after_a_step_resumes_exactly_and_exports(tmp_path):
    """Each rank's shards of the weights and of the optimizer state go into the checkpoint and come back:
    steps 2 and 3 are the uninterrupted run's. A checkpoint exports to the final model's very files."""
    flags = ("--ep", "2", "--max-steps", "3", "--save-steps", "1")
    uninterrupted = run(tmp_path / "a", *flags, processes=2)
    checkpoint = tmp_path / "a" / "checkpoint-1"
    for part in ("model", "optimizer"):  # one file per rank, nothing gathered
        assert len(list((checkpoint / part).glob("*.distcp"))) == 2, part
    assert not list(checkpoint.glob("*.safetensors"))
    resumed = run(tmp_path / "b", *flags, "--resume", str(checkpoint), processes=2)
    assert_same_run(resumed, uninterrupted[1:], tmp_path / "b", tmp_path / "a")

    export_checkpoint(tmp_path / "a" / "checkpoint-3", tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    final = load_file(tmp_path / "a" / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    reloaded, final_model = load_policy(tmp_path / "exported"), load_policy(tmp_path / "a" / "final")
    assert reloaded.config.to_diff_dict() == final_model.config.to_diff_dict()
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_only_sharded_checkpoints_export(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no sharded weights"):
        export_checkpoint(tmp_path, tmp_path / "out")
