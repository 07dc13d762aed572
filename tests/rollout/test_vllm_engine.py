"""The vLLM engine: its pure parts on CPU, the engine itself where vLLM and GPUs are (marked vllm + gpu)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.checkpoint import to_released
from r1kit.rollout.buckets import plan_buckets
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.sync_group import Rendezvous
from r1kit.rollout.vllm_engine import (
    batch_from_outputs,
    cpu_attention_config,
    cpu_compilation_config,
    request_seeds,
    vllm_sampling_kwargs,
)
from r1kit.rollout.vllm_extension import plain_plan, plain_rendezvous, plan_from_plain
from r1kit.rollout.vllm_weights import vllm_named_weights
from tests.rollout.conftest import EOS, max_logprob_error, word_tokenizer
from tests.rollout.test_torch_engine import tiny_llama


def test_sampling_kwargs() -> None:
    params = SamplingParams(
        n=4,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        max_new_tokens=33,
        stop_token_ids=(1, 2),
        stop_strings=("</answer>",),
        seed=5,
    )
    assert vllm_sampling_kwargs(params, seed=123) == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "max_tokens": 33,
        "stop_token_ids": [1, 2],
        "stop": ["</answer>"],
        "include_stop_str_in_output": True,
        "ignore_eos": True,
        "seed": 123,
        "logprobs": 0,
        "skip_special_tokens": True,
    }
    for off in (0, -1):  # every vLLM release reads -1 as "no top-k"
        assert vllm_sampling_kwargs(SamplingParams(top_k=off), seed=None)["top_k"] == -1


def test_sampling_kwargs_refuse_what_vllm_would_change() -> None:
    with pytest.raises(ValueError, match=r"below 0\.01"):
        vllm_sampling_kwargs(SamplingParams(temperature=0.005), seed=None)
    assert vllm_sampling_kwargs(SamplingParams(n=4, temperature=0.0), seed=None)["temperature"] == 0.0


def test_every_sample_gets_its_own_seed() -> None:
    seeds = request_seeds(5, num_prompts=3, params=SamplingParams(n=4, seed=5))
    assert len(seeds) == len(set(seeds)) == 12  # vLLM's seed + j would repeat across prompts
    assert seeds == request_seeds(5, 3, SamplingParams(n=4))
    assert not set(seeds) & set(request_seeds(6, 3, SamplingParams(n=4)))  # a worker's shard seed + 1
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert request_seeds(None, 2, SamplingParams(n=3)) == [None] * 6
    assert len(request_seeds(5, 3, SamplingParams(n=4, temperature=0.0))) == 3  # greedy: one request per prompt


def test_cpu_builds_use_vllms_pytorch_rotary() -> None:
    """vLLM's CPU rotary op mis-rotates MLA's 3-D rope queries (tests/rollout/test_vllm_cpu.py measures it)."""
    assert cpu_compilation_config(None) == {"custom_ops": ["-rotary_embedding"]}
    assert cpu_compilation_config({"mode": 0, "custom_ops": ["+rms_norm"]}) == {
        "mode": 0,
        "custom_ops": ["+rms_norm", "-rotary_embedding"],
    }
    assert cpu_compilation_config({"custom_ops": ["+rotary_embedding"]}) == {"custom_ops": ["+rotary_embedding"]}
    config = object()  # a vLLM CompilationConfig: the caller's choice
    assert cpu_compilation_config(config) is config


def test_vllms_cpu_build_serves_mla_in_bfloat16_only_on_its_amx_backend() -> None:
    """Other dtypes get the reference CPU MLA backend (AMX hosts picked AMX for fp32 and failed to load)."""
    assert cpu_attention_config(None, "float32") == {"backend": "CPU_MLA"}
    assert cpu_attention_config(None, "auto") == {"backend": "CPU_MLA"}
    assert cpu_attention_config({"flash_attn_version": 2}, torch.float16) == {
        "flash_attn_version": 2,
        "backend": "CPU_MLA",
    }
    assert cpu_attention_config(None, "bfloat16") is None
    assert cpu_attention_config(None, torch.bfloat16) is None
    assert cpu_attention_config({"backend": "AMX_MLA"}, "float32") == {"backend": "AMX_MLA"}
    config = object()  # a vLLM AttentionConfig: the caller's choice
    assert cpu_attention_config(config, "float32") is config


def test_plans_and_rendezvous_cross_vllms_msgspec_hop() -> None:
    msgspec = pytest.importorskip("msgspec")
    plan = plan_buckets([("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (5,)), ("c", torch.int64, ())], 64)
    rendezvous = Rendezvous("127.0.0.1", 1234, 3, "gloo", 30.0, "r1kit-weights-1")
    crossed = msgspec.msgpack.decode(msgspec.msgpack.encode((plain_rendezvous(rendezvous), plain_plan(plan))))
    assert Rendezvous(**crossed[0]) == rendezvous
    assert plan_from_plain(crossed[1]) == plan


# The attributes vLLM's RequestOutput / CompletionOutput / Logprob carry (vllm.outputs, vllm.logprobs).
@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


def request(tokens: list[int], reason: str) -> RequestOutput:
    return RequestOutput(
        [CompletionOutput(0, f"text{tokens}", tokens, [{t: Logprob(-0.5 * t)} for t in tokens], reason)]
    )


def test_batch_from_outputs_reads_one_completion_per_request_in_row_order() -> None:
    outputs = [request([4, 5, 6], "length"), request([3, 1], "stop"), request([7], "length"), request([8, 1], "stop")]
    batch = batch_from_outputs(outputs, [[10, 11], [12]], n=2, version=3)
    assert batch.prompt_ids == [[10, 11], [10, 11], [12], [12]]
    assert batch.completion_ids == [[4, 5, 6], [3, 1], [7], [8, 1]]
    assert batch.finish_reason == ["length", "stop", "length", "stop"]
    assert torch.equal(batch.sampler_logprobs[0], torch.tensor([-2.0, -2.5, -3.0]))
    assert batch.policy_version == 3
    greedy = batch_from_outputs([request([4, 1], "stop"), request([7], "length")], [[10], [12]], 3, 0, copies=3)
    assert greedy.completion_ids == [[4, 1]] * 3 + [[7]] * 3
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        batch_from_outputs([request([4], "abort")], [[1]], n=1, version=0)
    with pytest.raises(RuntimeError, match="1 outputs for 1 prompts x 2"):
        batch_from_outputs([request([4], "stop")], [[1]], n=2, version=0)


def test_deepseek_weights_reach_vllm_under_released_names() -> None:
    config = preset_config("tiny-debug")
    state = DeepseekV3ForCausalLM(config).state_dict()
    sent = dict(vllm_named_weights(state.items(), config))
    main_model = {
        k: v for k, v in to_released(state, config) if not k.startswith(f"model.layers.{config.num_hidden_layers}.")
    }
    assert sent.keys() == main_model.keys()
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in sent and not any(k.startswith("mtp.") for k in sent)
    assert all(torch.equal(sent[k], main_model[k]) for k in sent)
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert sent["model.layers.1.mlp.experts.3.gate_proj.weight"].data_ptr() == gate_up[3].data_ptr()  # views


def test_other_models_keep_their_names() -> None:
    model = tiny_llama()
    assert [k for k, _ in vllm_named_weights(model.state_dict().items(), model.config)] == list(model.state_dict())


# ---------------------------------------------------------------------------------------------- on GPUs, with vLLM
def save_llama(directory: Path) -> torch.nn.Module:
    model = tiny_llama()
    model.save_pretrained(directory)
    word_tokenizer(128).save_pretrained(directory)
    return model


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.device))


@pytest.mark.vllm
@pytest.mark.gpu
def test_colocated_engine_updates_in_place_and_agrees_with_the_trainer(tmp_path: Path) -> None:
    from r1kit.rollout.vllm_engine import VLLMRolloutEngine

    model = save_llama(tmp_path).float().cuda()
    engine = VLLMRolloutEngine(
        str(tmp_path), colocate=True, sleep_level=1, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True
    )
    try:
        params = SamplingParams(n=2, max_new_tokens=12, stop_token_ids=(EOS,), seed=0)
        for version in (1, 2, 3):
            perturb(model, version)
            engine.update_weights(model.state_dict().items(), version)
            batch = engine.generate([[5, 6, 7], [8, 9]], params)
            assert batch.policy_version == version
            assert max_logprob_error(model.cpu(), batch, temperature=1.0) < 1e-3
            model.cuda()
    finally:
        engine.close()


@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a vLLM worker on its own GPU needs two GPUs")
def test_vllm_worker_receives_weights_over_nccl(tmp_path: Path) -> None:
    from r1kit.rollout.remote import RemoteEngineConfig, RemoteRolloutEngine
    from r1kit.rollout.serve import WorkerOptions

    model = save_llama(tmp_path).float().cuda(0)
    options = WorkerOptions(engine="vllm", dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    config = RemoteEngineConfig(start_timeout_s=600, generate_timeout_s=120, sync_timeout_s=120, bucket_mb=0.01)
    with RemoteRolloutEngine.launch(tmp_path, options=options, config=config, visible_devices=["1"]) as engine:
        for version in (1, 2):
            perturb(model, version)
            engine.update_weights(model.state_dict().items(), version)
            batch = engine.generate([[5, 6, 7]], SamplingParams(n=4, max_new_tokens=12, seed=0))
            assert batch.policy_version == version
            assert max_logprob_error(model.cpu(), batch, temperature=1.0) < 1e-3
            model.cuda(0)
