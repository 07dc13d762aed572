"""Keep routing and keep sampling mask end to end: the torch engine records, the trainer replays.

The trainer's copy gets random routing biases: its routers would choose other
experts (the bias steers selection only), so only a correct replay of every
recorded token, prompt and completion, at the right column of the padded
batch, reproduces the sampler's log-probs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from r1kit.grpo.batch import build_policy_batch
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.rollout.conftest import PAD, word_tokenizer
from tests.rollout.test_torch_engine import PROMPTS, tiny_llama

RECORD = SamplingParams(n=3, temperature=1.0, top_p=0.8, top_k=20, max_new_tokens=12, seed=1,
                        stop_token_ids=(7, 9, 11), record_routing=True, record_kept_tokens=True)  # fmt: skip


@pytest.fixture(scope="module")
def sampler() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(preset_config("tiny-debug")).eval()


@pytest.fixture(scope="module")
def rollout(sampler):
    engine = TorchRolloutEngine(sampler, word_tokenizer(sampler.config.vocab_size), max_batch_rows=4)
    return engine.generate(PROMPTS, RECORD)


def trainer_with_other_routing(sampler: DeepseekV3ForCausalLM) -> TokenLogprobModel:
    trainer = copy.deepcopy(sampler)
    generator = torch.Generator().manual_seed(0)
    for router in trainer.routers():
        router.e_score_correction_bias.add_(5 * torch.randn(router.num_experts, generator=generator))
    return TokenLogprobModel(trainer)


def test_every_row_records_its_routing_and_kept_sets(sampler, rollout) -> None:
    config = sampler.config
    lengths = [len(ids) for ids in rollout.completion_ids]
    assert len(set(lengths)) > 1  # rows finished at different steps
    for prompt, completion, routing, kept in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.routed_experts, rollout.kept_tokens, strict=True
    ):
        moe_layers = config.num_hidden_layers - config.first_k_dense_replace
        assert routing.dtype == torch.int16
        assert routing.shape == (moe_layers, len(prompt) + len(completion) - 1, config.num_experts_per_tok)
        assert routing.min() >= 0 and routing.max() < config.n_routed_experts
        assert len(kept) == len(completion)
        mask = kept.to_mask(config.vocab_size)
        assert mask[torch.arange(len(completion)), torch.tensor(completion)].all()
        assert (mask.sum(-1) <= 20).all()  # top_k = 20


def test_the_trainer_reproduces_the_sampler_only_with_the_recorded_routing(sampler, rollout) -> None:
    batch = build_policy_batch(rollout, PAD)
    trainer, mask = trainer_with_other_routing(sampler), batch.completion_mask
    inputs = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_length)
    with torch.no_grad():
        kept = trainer(*inputs, routed_experts=batch.routed_experts, kept_tokens=batch.kept_tokens).logp
        rerouted = trainer(*inputs, kept_tokens=batch.kept_tokens).logp
    assert ((kept - batch.sampler_logprobs).abs() * mask).max() < 1e-5
    assert ((rerouted - batch.sampler_logprobs).abs() * mask).max() > 1e-2
    part = batch.rows(torch.tensor([7, 1, 4]))  # micro-batches keep the layout
    with torch.no_grad():
        logp = trainer(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length,
                       routed_experts=part.routed_experts, kept_tokens=part.kept_tokens).logp  # fmt: skip
    assert ((logp - part.sampler_logprobs).abs() * part.completion_mask).max() < 1e-5


def test_the_sampling_mask_is_what_makes_truncated_logprobs_match(sampler, rollout) -> None:
    batch = build_policy_batch(rollout, PAD)
    mask = batch.completion_mask
    with torch.no_grad():
        full = TokenLogprobModel(sampler)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                          batch.prompt_length).logp  # fmt: skip
    gap = (batch.sampler_logprobs - full) * mask  # log of 1 / (the kept set's mass) >= 0
    assert gap.min() > -1e-5 and gap.max() > 1e-2


def test_recording_routing_needs_a_moe_policy() -> None:
    engine = TorchRolloutEngine(tiny_llama(), word_tokenizer(128))
    with pytest.raises(ValueError, match="DeepSeekMoE"):
        engine.generate(PROMPTS, SamplingParams(n=2, record_routing=True))


def test_recording_routing_needs_moe_layers_not_just_our_class() -> None:
    dense = DeepseekV3ForCausalLM(preset_config("tiny-debug", first_k_dense_replace=2)).eval()
    engine = TorchRolloutEngine(dense, word_tokenizer(dense.config.vocab_size))
    with pytest.raises(ValueError, match="DeepSeekMoE"):
        engine.generate(PROMPTS, SamplingParams(n=2, record_routing=True))
