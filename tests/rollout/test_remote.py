"""Worker processes end to end, on CPU over gloo: exact weight sync, versions, and failures that never hang.

Every engine is closed in a fixture's teardown or a `finally`, and the tests
check that no worker process outlives its engine.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1kit.policy.loading import load_policy
from r1kit.rollout.engine import RolloutEngine, SamplingParams
from r1kit.rollout.errors import RolloutWorkerDied, RolloutWorkerError, RolloutWorkerTimeout
from r1kit.rollout.launch import WorkerProcess
from r1kit.rollout.messages import AUTHKEY_ENV
from r1kit.rollout.remote import RemoteEngineConfig, RemoteRolloutEngine
from r1kit.rollout.serve import WorkerOptions
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.rollout.conftest import EOS, max_logprob_error, word_tokenizer

OPTIONS = WorkerOptions(dtype="float32", num_threads=1)
CONFIG = RemoteEngineConfig(
    start_timeout_s=120, generate_timeout_s=60, sync_timeout_s=30, bucket_mb=0.05, poll_interval_s=0.05
)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12], [13, 14]]
TEMPERATURE = 0.9


def params(seed: int, **overrides) -> SamplingParams:
    fields = {"n": 2, "temperature": TEMPERATURE, "max_new_tokens": 10, "stop_token_ids": (EOS,), "seed": seed}
    return SamplingParams(**{**fields, **overrides})


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every floating tensor of the state dict (routing biases included), so a stale one would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture
def trainer(checkpoint: Path) -> torch.nn.Module:
    return load_policy(checkpoint).eval()


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    engine = RemoteRolloutEngine.launch(checkpoint, num_workers=2, options=OPTIONS, config=CONFIG)
    pids = engine.worker_pids
    yield engine
    engine.close()
    assert_gone(pids)


def test_logprobs_agree_with_the_trainer_after_every_update(engine: RemoteRolloutEngine, trainer) -> None:
    assert isinstance(engine, RolloutEngine)
    previous = None
    for version in (1, 2, 3):
        perturb(trainer, seed=version)
        engine.update_weights(trainer.state_dict().items(), version)
        batch = engine.generate(PROMPTS, params(seed=version))
        assert batch.policy_version == engine.policy_version == version
        assert [row for row in batch.prompt_ids[::2]] == PROMPTS  # both workers' shards, in prompt order
        assert max_logprob_error(trainer, batch, TEMPERATURE) < 1e-4
        if previous is not None:  # the test can tell a stale worker from a synced one
            assert max_logprob_error(previous, batch, TEMPERATURE) > 1e-3
        previous = copy.deepcopy(trainer)


def test_an_update_waits_for_the_batch_in_flight(engine: RemoteRolloutEngine, trainer) -> None:
    engine.update_weights(trainer.state_dict().items(), version=10)
    before = copy.deepcopy(trainer)
    future = engine.generate_async(PROMPTS, params(seed=0, n=4, max_new_tokens=200, stop_token_ids=()))
    assert not future.done()
    perturb(trainer, seed=11)
    engine.update_weights(trainer.state_dict().items(), version=11)
    assert future.done()  # the update went out only after the batch was complete
    batch = future.result()
    assert batch.policy_version == 10
    assert max_logprob_error(before, batch, TEMPERATURE) < 1e-4


def test_a_worker_samples_what_the_in_process_engine_samples(engine: RemoteRolloutEngine, trainer) -> None:
    engine.update_weights(trainer.state_dict().items(), version=20)
    local = TorchRolloutEngine(trainer, word_tokenizer(trainer.config.vocab_size))
    remote = engine.generate(PROMPTS[:1], params(seed=5))  # one prompt: worker 0 alone, seed unchanged
    expected = local.generate(PROMPTS[:1], params(seed=5))
    assert remote.completion_ids == expected.completion_ids
    assert remote.completion_text == expected.completion_text


def test_recorded_routing_and_kept_sets_come_back_from_the_workers(engine: RemoteRolloutEngine, trainer) -> None:
    engine.update_weights(trainer.state_dict().items(), version=30)
    recording = params(seed=6, top_k=12, record_routing=True, record_kept_tokens=True)
    both = engine.generate(PROMPTS, recording)  # both workers' shards
    assert len(both.routed_experts) == len(both.kept_tokens) == len(PROMPTS) * 2
    remote = engine.generate(PROMPTS[:1], recording)  # one prompt: worker 0 alone, seed unchanged
    local = TorchRolloutEngine(trainer, word_tokenizer(trainer.config.vocab_size)).generate(PROMPTS[:1], recording)
    for mine, theirs in zip(local.routed_experts, remote.routed_experts, strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(local.kept_tokens, remote.kept_tokens, strict=True):
        assert torch.equal(mine.ids, theirs.ids) and torch.equal(mine.offsets, theirs.offsets)


def test_a_speculative_worker_samples_what_the_in_process_engine_samples(checkpoint: Path, trainer) -> None:
    options = WorkerOptions(dtype="float32", num_threads=1, num_speculative_tokens=2)
    engine = RemoteRolloutEngine.launch(checkpoint, options=options, config=CONFIG)
    try:
        recording = params(seed=7, record_routing=True)
        remote = engine.generate(PROMPTS, recording)
        local = TorchRolloutEngine(trainer, word_tokenizer(trainer.config.vocab_size), num_speculative_tokens=2)
        expected = local.generate(PROMPTS, recording)
        assert remote.completion_ids == expected.completion_ids
        assert remote.draft_counts == expected.draft_counts
        assert sum(row.drafted for row in remote.draft_counts) > 0
        for mine, theirs in zip(expected.routed_experts, remote.routed_experts, strict=True):
            assert torch.equal(mine, theirs)
    finally:
        engine.close()


def test_a_plan_the_worker_cannot_load_is_refused_and_changes_nothing(engine: RemoteRolloutEngine, trainer) -> None:
    engine.update_weights(trainer.state_dict().items(), version=30)
    bad = [*trainer.state_dict().items(), ("extra.weight", torch.zeros(3))]
    with pytest.raises(RolloutWorkerError, match=r"rollout worker 0 .*no tensor named 'extra\.weight'"):
        engine.update_weights(bad, version=31)
    batch = engine.generate(PROMPTS, params(seed=1))
    assert batch.policy_version == engine.policy_version == 30
    assert max_logprob_error(trainer, batch, TEMPERATURE) < 1e-4


def test_a_worker_killed_mid_generation_is_named_at_once(checkpoint: Path) -> None:
    engine = RemoteRolloutEngine.launch(checkpoint, options=OPTIONS, config=CONFIG)
    pid = engine.worker_pids[0]
    try:
        future = engine.generate_async(PROMPTS, params(seed=0, n=64, max_new_tokens=200, stop_token_ids=()))
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RolloutWorkerDied, match=rf"rollout worker 0 \(127\.0\.0\.1:\d+, pid {pid}\): died"):
            future.result(timeout=30)
        assert time.monotonic() - start < 5
        with pytest.raises(RuntimeError, match=r"cannot be used after.*rollout worker 0"):
            engine.generate(PROMPTS, params(seed=0))
    finally:
        engine.close()
    assert_gone([pid])


@pytest.mark.parametrize("call", ["generate", "update_weights"])
def test_a_hung_worker_times_out_naming_it(checkpoint: Path, trainer, call: str) -> None:
    config = RemoteEngineConfig(start_timeout_s=120, generate_timeout_s=2, sync_timeout_s=2, poll_interval_s=0.05)
    engine = RemoteRolloutEngine.launch(checkpoint, options=OPTIONS, config=config)
    pid = engine.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(RolloutWorkerTimeout, match=rf"rollout worker 0 \(127\.0\.0\.1:\d+, pid {pid}\)"):
            if call == "generate":
                engine.generate(PROMPTS, params(seed=0))
            else:
                engine.update_weights(trainer.state_dict().items(), version=1)
        assert time.monotonic() - start < 10
    finally:
        os.kill(pid, signal.SIGCONT)
        engine.close()
    assert_gone([pid])


def test_a_restarted_worker_gets_the_last_weights_and_a_death_during_sync_is_named(checkpoint: Path, trainer) -> None:
    config = RemoteEngineConfig(start_timeout_s=120, generate_timeout_s=60, sync_timeout_s=30, max_restarts=1)
    engine = RemoteRolloutEngine.launch(checkpoint, options=OPTIONS, config=config)
    first = engine.worker_pids[0]
    try:
        perturb(trainer, seed=7)
        engine.update_weights(trainer.state_dict().items(), version=1)
        os.kill(first, signal.SIGKILL)
        batch = engine.generate(PROMPTS, params(seed=2))  # finds the worker dead, restarts it, replays version 1
        second = engine.worker_pids[0]
        assert second != first and batch.policy_version == 1
        assert max_logprob_error(trainer, batch, TEMPERATURE) < 1e-4
        os.kill(second, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RolloutWorkerDied, match=rf"rollout worker 0 .*pid {second}\): died"):  # none left
            engine.update_weights(trainer.state_dict().items(), version=2)
        assert time.monotonic() - start < 10
    finally:
        engine.close()
    assert_gone([first, second])


@pytest.fixture
def served(checkpoint: Path, tmp_path: Path):
    """A worker started by hand, as on another GPU or host: `python -m r1kit.rollout.serve`."""
    port_file = tmp_path / "port"
    command = [sys.executable, "-m", "r1kit.rollout.serve", "--model", str(checkpoint), "--port_file", str(port_file)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, AUTHKEY_ENV: "secret", "PYTHONPATH": root}
    process = subprocess.Popen([*command, *OPTIONS.to_args()], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text()}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_trainers_connect_to_a_worker_started_by_hand(served: str, trainer) -> None:
    with pytest.raises(RolloutWorkerError, match="R1KIT_ROLLOUT_AUTHKEY"):
        RemoteRolloutEngine.connect([served], authkey="wrong", config=CONFIG)
    engine = RemoteRolloutEngine.connect([served], authkey="secret", config=CONFIG)
    try:
        with pytest.raises(RolloutWorkerError, match="serves another trainer"):
            RemoteRolloutEngine.connect([served], authkey="secret", config=CONFIG)
        perturb(trainer, seed=3)
        engine.update_weights(trainer.state_dict().items(), version=1)
        assert max_logprob_error(trainer, engine.generate(PROMPTS, params(seed=0)), TEMPERATURE) < 1e-4
    finally:
        engine.close()
    with RemoteRolloutEngine.connect([served], authkey="secret", config=CONFIG) as again:  # it serves the next one
        assert again.policy_version == 1
        assert max_logprob_error(trainer, again.generate(PROMPTS, params(seed=1)), TEMPERATURE) < 1e-4


def test_a_worker_that_cannot_start_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RolloutWorkerDied, match=r"rollout worker 0 \(pid \d+\): exited with code 1 while starting"):
        RemoteRolloutEngine.launch(tmp_path / "missing", options=OPTIONS, config=CONFIG)


def test_killing_a_dead_worker_still_ends_what_it_started(tmp_path: Path) -> None:
    """vLLM's engine processes are the worker's children in its process group: they must not outlive it."""
    child_pid = tmp_path / "child.pid"
    command = [sys.executable, "-c", f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
               f"'import time; time.sleep(300)']); open({str(child_pid)!r}, 'w').write(str(child.pid)); "
               "time.sleep(300)"]  # fmt: skip
    worker = WorkerProcess(subprocess.Popen(command, start_new_session=True), port=0, scratch=tmp_path / "scratch")
    while not child_pid.exists() or not child_pid.read_text():
        time.sleep(0.05)
    child = int(child_pid.read_text())
    try:
        os.kill(worker.pid, signal.SIGKILL)
        worker.popen.wait()  # the worker is gone and reaped; its child lives on in the group
        worker.kill()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as ended: it waits only for its parent to read its status)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
