"""The built-in engine: sampler log-probs equal a full forward; prefix sharing and cache sizing change nothing."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.rollout.conftest import EOS, max_logprob_error, word_tokenizer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(preset_config("tiny-debug")).eval(),
    "llama": tiny_llama,
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(("temperature", "top_p"), [(0.8, 1.0), (1.0, 0.7), (0.0, 1.0)])
def test_sampler_logprobs_equal_a_full_forward(kind: str, temperature: float, top_p: float) -> None:
    model = MODELS[kind]()
    engine = TorchRolloutEngine(model, word_tokenizer(128), max_batch_rows=4)  # 3 prompts x 3 samples: 3 batches
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12, seed=1,
                            record_kept_tokens=True)  # fmt: skip
    batch = engine.generate(PROMPTS, params)
    assert len(batch) == 9 and batch.prompt_ids[3] == PROMPTS[1]
    assert max_logprob_error(model, batch, temperature) < 1e-4


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_greedy_samples_equal_transformers_generate(kind: str) -> None:
    model = MODELS[kind]()
    batch = TorchRolloutEngine(model, word_tokenizer(128)).generate(
        PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    )
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=0)
        assert batch.completion_ids[2 * i] == batch.completion_ids[2 * i + 1] == expected[0, len(prompt) :].tolist()


def test_rows_stop_when_their_text_completes_a_stop_string() -> None:
    engine = TorchRolloutEngine(MODELS["llama"](), word_tokenizer(128))
    free = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, seed=3))
    # a two-word stop string that some free-running rows produce: those rows must end right after it
    words = [text.split() for text in free.completion_text]
    stop = " ".join(next(w[i : i + 2] for w in words for i in range(3, len(w) - 1)))
    batch = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, seed=3, stop_strings=(stop,)))
    stopped = 0
    for full, ids, text, reason in zip(free.completion_ids, batch.completion_ids, batch.completion_text,
                                       batch.finish_reason, strict=True):  # fmt: skip
        assert full[: len(ids)] == ids  # same seed: the same tokens up to the stop
        if reason == "stop":
            stopped += 1
            assert text.endswith(stop) and stop not in engine.tokenizer.decode(ids[:-1])
        else:
            assert stop not in text and len(ids) == 16
    assert stopped >= 1


def test_rows_stop_at_stop_tokens_and_say_why() -> None:
    engine = TorchRolloutEngine(MODELS["llama"](), word_tokenizer(128))
    stops = tuple(range(1, 40))  # a third of the vocabulary: most rows stop early, at different steps
    batch = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=20, stop_token_ids=stops, seed=0))
    lengths = [len(ids) for ids in batch.completion_ids]
    assert len(set(lengths)) > 3
    for ids, reason, logprobs in zip(batch.completion_ids, batch.finish_reason, batch.sampler_logprobs, strict=True):
        assert len(logprobs) == len(ids)
        assert all(token not in stops for token in ids[:-1])
        assert reason == ("stop" if ids[-1] in stops else "length")
        assert reason == "stop" or len(ids) == 20
    assert batch.num_generated_tokens == sum(lengths)
    assert batch.completion_text[0] == " ".join(f"t{t}" for t in batch.completion_ids[0] if t != EOS)


def test_seeded_generation_is_reproducible() -> None:
    engine = TorchRolloutEngine(MODELS["deepseek_v3"](), word_tokenizer(128))
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    assert engine.generate(PROMPTS, params).completion_ids == engine.generate(PROMPTS, params).completion_ids


def test_load_weights_copies_in_place_and_only_update_weights_stamps_a_version() -> None:
    model = MODELS["llama"]()
    engine = TorchRolloutEngine(model, word_tokenizer(128))
    new = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    engine.load_weights(list(new.items())[:3])
    assert engine.policy_version == 0
    engine.update_weights(new.items(), version=4)
    assert engine.policy_version == 4
    assert all(torch.equal(model.state_dict()[name], t) for name, t in new.items())
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))], version=5)


def test_is_a_rollout_engine_and_generate_async_returns_the_same_batch() -> None:
    from r1kit.rollout.engine import RolloutEngine

    engine = TorchRolloutEngine(MODELS["deepseek_v3"](), word_tokenizer(128))
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(n=2, max_new_tokens=6, seed=11)
    try:
        future = engine.generate_async(PROMPTS, params)
        assert future.result(timeout=60).completion_ids == engine.generate(PROMPTS, params).completion_ids
    finally:
        engine.close()


def test_empty_prompts_are_refused() -> None:
    engine = TorchRolloutEngine(MODELS["llama"](), word_tokenizer(128))
    with pytest.raises(ValueError, match="no empty prompt"):
        engine.generate([[]], SamplingParams())
