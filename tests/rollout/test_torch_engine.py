"""The built-in engine against a full forward and against transformers' generate."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.batch import build_policy_batch
from grpo.logprobs import TokenLogprobModel
from rollout.engine import RolloutEngine, SamplingParams
from rollout.torch_engine import TorchRolloutEngine

PROMPTS = ["Question: Mia has 3 pens. She gets 2 more.\n", "Question: Tom has 12 coins.\n", "Question: Ava\n"]


@pytest.fixture(params=["deepseek_v3", "llama"])
def model(request, arithmetic_tokenizer, debug_policy):
    if request.param == "deepseek_v3":
        return debug_policy
    tok = arithmetic_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p)["input_ids"] for p in prompts]


def test_is_a_rollout_engine(model, arithmetic_tokenizer):
    assert isinstance(TorchRolloutEngine(model, arithmetic_tokenizer), RolloutEngine)


def test_sampler_logprobs_equal_a_full_forward(model, arithmetic_tokenizer):
    tok = arithmetic_tokenizer
    engine = TorchRolloutEngine(model, tok, max_batch_rows=4)  # 9 rows: three chunks
    params = SamplingParams(n=3, temperature=0.9, max_new_tokens=12, stop_token_ids=(tok.eos_token_id,), seed=3)
    rollout = engine.generate(encode(tok), params)
    assert len(rollout) == 9 and rollout.prompt_ids[3] == rollout.prompt_ids[5] == encode(tok)[1]
    batch = build_policy_batch(rollout, tok.pad_token_id)
    with torch.no_grad():
        logp = TokenLogprobModel(model, temperature=0.9)(
            batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_length
        ).logp
    mask = batch.completion_mask.bool()
    assert (logp[mask] - batch.sampler_logprobs[mask]).abs().max() < 1e-5


def test_greedy_decoding_matches_transformers_generate(model, arithmetic_tokenizer):
    tok = arithmetic_tokenizer
    engine = TorchRolloutEngine(model, tok)
    rollout = engine.generate(encode(tok), SamplingParams(n=1, temperature=0.0, max_new_tokens=10))
    for prompt, completion in zip(encode(tok), rollout.completion_ids, strict=True):
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )[0, len(prompt) :]
        assert completion == expected.tolist()


def test_stop_tokens_end_rows_and_finished_rows_leave_the_batch(arithmetic_tokenizer, debug_policy):
    tok = arithmetic_tokenizer
    engine = TorchRolloutEngine(debug_policy, tok)
    free = engine.generate(encode(tok), SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    # stop on the token each row emits at a different step, so rows finish at different times
    stops = tuple({ids[k] for k, ids in zip((1, 4, 7), free.completion_ids, strict=True)})
    stopped = engine.generate(encode(tok), SamplingParams(n=1, temperature=0.0, max_new_tokens=8, stop_token_ids=stops))
    for full, cut, reason in zip(free.completion_ids, stopped.completion_ids, stopped.finish_reason, strict=True):
        first_stop = next((i for i, t in enumerate(full) if t in stops), None)
        if first_stop is None:
            assert cut == full and reason == "length"
        else:
            assert cut == full[: first_stop + 1] and reason == "stop"
    assert stopped.num_generated_tokens < free.num_generated_tokens


def test_update_weights_copies_in_place_and_stamps_the_version(arithmetic_tokenizer, debug_policy):
    engine = TorchRolloutEngine(copy.deepcopy(debug_policy), arithmetic_tokenizer)
    new_state = {k: v + 0.01 if v.is_floating_point() else v for k, v in debug_policy.state_dict().items()}
    engine.update_weights(new_state.items(), version=7)
    assert engine.policy_version == 7
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, new_state[name]), name
    batch = engine.generate(encode(arithmetic_tokenizer)[:1], SamplingParams(n=2, max_new_tokens=2))
    assert batch.policy_version == 7
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))], version=8)


def test_generate_async_returns_the_same_batch(arithmetic_tokenizer, debug_policy):
    engine = TorchRolloutEngine(debug_policy, arithmetic_tokenizer)
    params = SamplingParams(n=2, max_new_tokens=6, seed=11)
    try:
        future = engine.generate_async(encode(arithmetic_tokenizer), params)
        assert (
            future.result(timeout=60).completion_ids
            == engine.generate(encode(arithmetic_tokenizer), params).completion_ids
        )
    finally:
        engine.close()


def test_bad_input(arithmetic_tokenizer, debug_policy):
    engine = TorchRolloutEngine(debug_policy, arithmetic_tokenizer)
    with pytest.raises(ValueError, match="no empty prompt"):
        engine.generate([[]], SamplingParams())
