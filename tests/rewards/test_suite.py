"""The reward suite: placement, time limits, error policies, totals, and where it can be called from."""

import asyncio
import json
import math
import os
import threading
import time

import pytest
import torch
import torch.multiprocessing

from r1kit.rewards import RewardError, RewardSuite, RewardSuiteConfig

HOSTILE = "tests.rewards.hostile_rewards"


def test_worker_timeouts_crashes_and_errors_are_pinned_on_their_completion():
    completions = ["ok", "hang", "boom", "exit", "none", "spin", "fine!"]
    config = RewardSuiteConfig(timeout_s=0.5, num_workers=2, on_error="zero")
    start = time.monotonic()
    with RewardSuite([f"{HOSTILE}:misbehaving"], config=config) as suite:
        result = suite.score(["p"] * 7, completions)
        again = suite.score(["p", "p"], ["ok", "fine!"])  # replaced workers keep serving
    assert time.monotonic() - start < 10
    scores = result.scores["misbehaving"]
    assert scores[[0, 1, 2, 3, 5, 6]].tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 5.0]
    assert math.isnan(scores[4])  # None stays "not applicable", not 0
    failures = {(f.index, f.kind) for f in result.failures}
    assert failures == {(1, "timeout"), (5, "timeout"), (2, "error"), (3, "error")}
    assert "ValueError: boom" in next(f.message for f in result.failures if f.index == 2)
    assert "exited with code 3" in next(f.message for f in result.failures if f.index == 3)
    assert again.scores["misbehaving"].tolist() == [2.0, 5.0]


def test_error_policies_none_and_raise():
    def flaky(completions, **columns):
        if "bad" in completions:
            raise ValueError("bad completion")
        return [1.0] * len(completions)

    none_policy = RewardSuiteConfig(num_workers=0, on_error="none")
    with RewardSuite([flaky], config=none_policy) as suite:
        result = suite.score(["p"] * 3, ["a", "bad", "c"])
    scores = result.scores["flaky"]
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 1.0
    assert result.count("flaky", "error") == 1 and result.mean("flaky") == 1.0
    raising = RewardSuite([flaky], config=RewardSuiteConfig(num_workers=0, on_error="raise"))
    with raising, pytest.raises(RewardError, match="reward 'flaky' error on completion 1") as error:
        raising.score(["p"] * 3, ["a", "bad", "c"])
    assert [(f.reward, f.index) for f in error.value.failures] == [("flaky", 1)]


def test_weighted_total_counts_none_as_zero_but_means_leave_it_out():
    def half(completions, **columns):
        return [0.5] * len(completions)

    def sometimes(completions, **columns):
        return [None if c == "skip" else 1.0 for c in completions]

    with RewardSuite([half, sometimes], weights=[2.0, 0.5], config=RewardSuiteConfig(num_workers=0)) as suite:
        result = suite.score(["p", "q"], ["x", "skip"])
    assert result.total.tolist() == [1.5, 1.0]
    assert result.mean("sometimes") == 1.0
    assert result.matrix.shape == (2, 2) and result.matrix.dtype == torch.float32
    metrics = result.metrics()
    assert metrics["rewards/sometimes/not_applicable"] == 1.0
    assert metrics["rewards/half/errors"] == 0.0 and metrics["rewards/total/mean"] == 1.25


def test_placement_of_lambdas_async_and_batched_functions():
    async def async_reward(completions, **columns):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    suite = RewardSuite(
        [
            "format",
            lambda completions, **c: [0.0] * len(completions),
            async_reward,
            f"{HOSTILE}:fails_on_bad",
        ],
        config=RewardSuiteConfig(num_workers=1),
    )
    with suite:
        assert "format(workers" in repr(suite) and "<lambda>(in-process" in repr(suite)
        assert "async_reward(in-process" in repr(suite) and "fails_on_bad(in-process" in repr(suite)
        result = suite.score(["p"] * 3, ["a", "bad", "c"])
    # the batched call raised; scoring one by one pinned the error on completion 1 only
    assert result.scores["fails_on_bad"].tolist() == [1.0, 0.0, 1.0]
    assert [(f.reward, f.index) for f in result.failures] == [("fails_on_bad", 1)]
    assert result.scores["async_reward"].tolist() == [1.0, 1.0, 1.0]


def test_in_process_call_timeout_and_contract_violations():
    config = RewardSuiteConfig(num_workers=0, call_timeout_s=0.3)
    with RewardSuite([f"{HOSTILE}:sleepy", f"{HOSTILE}:wrong_length"], config=config) as suite:
        start = time.monotonic()
        result = suite.score(["p"] * 4, ["a", "b", "c", "d"], {"seconds": [1.0] * 4})  # sleepy: 4 s
    assert time.monotonic() - start < 2.0  # the call was abandoned at its limit
    assert result.count("sleepy", "timeout") == 4
    assert result.count("wrong_length", "error") == 4
    assert "returned 2 scores for 1 completions" in result.failures[-1].message


def test_workers_are_reused_and_stopped_on_close():
    suite = RewardSuite([f"{HOSTILE}:worker_pid"], config=RewardSuiteConfig(num_workers=2))
    first = set(suite.score(["p"] * 8, ["x"] * 8).scores["worker_pid"].tolist())
    second = set(suite.score(["p"] * 8, ["x"] * 8).scores["worker_pid"].tolist())
    assert first == second and os.getpid() not in first and len(first) <= 2
    suite.close()
    for pid in first:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    with pytest.raises(RuntimeError, match="closed"):
        suite.score(["p"], ["x"])


def test_math_accuracy_in_a_non_main_thread_without_workers():
    results = []

    def run():
        with RewardSuite(["math_accuracy"], config=RewardSuiteConfig(num_workers=0)) as suite:
            results.append(suite.score(["q"], [r"\boxed{\frac{1}{2}}"], {"answer": ["0.5"]}))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results[0].scores["math_accuracy"].tolist() == [1.0] and not results[0].failures


def test_inside_a_torch_multiprocessing_process(tmp_path):
    from tests.rewards.spawned import score_in_child

    output = tmp_path / "child.json"
    torch.multiprocessing.spawn(score_in_child, args=(str(output),), nprocs=1, join=True)
    assert json.loads(output.read_text()) == {"rank": 0, "total": [2.0, 0.0]}


def test_bad_configs_and_batches_raise_naming_the_field():
    with pytest.raises(ValueError, match="on_error"):
        RewardSuiteConfig(on_error="ignore")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardSuiteConfig(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardSuiteConfig(num_workers=-1)
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        RewardSuite(["format"], weights=[1.0, 2.0])
    with RewardSuite(["format", "format"], config=RewardSuiteConfig(num_workers=0)) as suite:
        assert suite.names == ["format", "format_2"]
        with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
            suite.score(["p", "q"], ["a", "b"], {"answer": ["1"]})
        with pytest.raises(ValueError, match="2 prompts for 1 completions"):
            suite.score(["p", "q"], ["a"])
