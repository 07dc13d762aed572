"""MTP self-speculative decoding: exact target samples, greedy equal to plain decoding, recorded routing and
kept sets the trainer can replay, and rows that stop mid-round."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from r1kit.grpo.batch import build_policy_batch
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.sampling import processed_logprobs
from r1kit.rollout.speculative import verify_drafts
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.rollout.conftest import PAD, word_tokenizer
from tests.rollout.test_torch_engine import PROMPTS, tiny_llama

SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8)]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed `counts` against `probs` over the cells with probability > 0,
    and its degrees of freedom; observations in zero-probability cells make it infinite."""
    total, support = counts.sum(), probs > 0
    if bool(counts[~support].any()):
        return math.inf, 0
    expected = probs[support] * total
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def far_in_the_tail(statistic: float, dof: int) -> bool:
    """More than six standard deviations above the chi-square mean (p < 1e-6 for these dofs)."""
    return statistic > dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("sampling", SETTINGS)
def test_verified_tokens_follow_the_target_whatever_the_draft(sampling) -> None:
    rows, k, vocab = 40_000, 2, 6
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.randn(k + 1, vocab, generator=generator).expand(rows, -1, -1)
    draft_logits = torch.randn(k, vocab, generator=generator)  # a different, imperfect draft
    draft_probs = processed_logprobs(draft_logits, **sampling)[0].exp().expand(rows, -1, -1)
    drafts = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=generator).view(rows, k)
    out = verify_drafts(target_logits, drafts, draft_probs, generator=generator, **sampling)
    target_logp = processed_logprobs(target_logits[0], **sampling)[0]  # (k + 1, V)
    for position in range(k):  # given that it was emitted in this round, token j ~ p_j
        emitted = out.counts > position
        tokens = out.tokens[emitted, position]
        statistic, dof = chi_square(torch.bincount(tokens, minlength=vocab).float(), target_logp[position].exp())
        assert not far_in_the_tail(statistic, dof), (position, statistic, dof)
        assert torch.allclose(out.logprobs[emitted, position], target_logp[position, tokens])
    # the first draft is accepted with probability sum_v min(p_1, q_1)
    acceptance = torch.minimum(target_logp[0].exp(), draft_probs[0, 0]).sum()
    assert abs(float((out.counts > 1).float().mean()) - float(acceptance)) < 0.01
    assert ((out.tokens >= 0) == (torch.arange(k + 1) < out.counts.unsqueeze(1))).all()
    assert (out.logprobs[out.tokens < 0] == 0).all()


def test_greedy_verification_accepts_exactly_the_argmax_prefix() -> None:
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]]]).repeat(3, 1, 1)  # argmax 1, 0, 2
    drafts = torch.tensor([[1, 0], [1, 2], [2, 0]])
    out = verify_drafts(logits, drafts, None, temperature=0.0)
    assert out.counts.tolist() == [3, 2, 1]
    assert out.tokens.tolist() == [[1, 0, 2], [1, 0, -1], [1, -1, -1]]


@pytest.fixture(scope="module")
def small_vocab_policy() -> DeepseekV3ForCausalLM:
    """tiny-debug with 8 tokens and weights scaled up: peaked, position-dependent distributions that the
    untrained MTP module drafts only partly right (both acceptance and rejection happen)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset_config("tiny-debug", vocab_size=8)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(6)
    return model


def exact_pair_probabilities(model: DeepseekV3ForCausalLM, prompt: list[int], sampling: dict) -> torch.Tensor:
    """P(first two completion tokens = (a, b)) under the processed target distribution: (V, V)."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        first = processed_logprobs(model(torch.tensor([prompt])).logits[0, -1:], **sampling)[0][0].exp()  # (V,)
        pairs = torch.tensor([[*prompt, token] for token in range(vocab)])
        second = processed_logprobs(model(pairs).logits[:, -1], **sampling)[0].exp()  # (V, V)
    return first.unsqueeze(1) * second


@pytest.mark.parametrize("sampling", SETTINGS)
def test_speculative_rollouts_sample_the_policy_exactly(small_vocab_policy, sampling) -> None:
    vocab, prompt = 8, [3, 5, 2]
    engine = TorchRolloutEngine(small_vocab_policy, word_tokenizer(vocab), max_batch_rows=1000,
                                num_speculative_tokens=2)  # fmt: skip
    batch = engine.generate([prompt], SamplingParams(n=6000, max_new_tokens=4, seed=0, **sampling))
    pairs = torch.tensor([completion[:2] for completion in batch.completion_ids])
    counts = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).float()
    statistic, dof = chi_square(counts, exact_pair_probabilities(small_vocab_policy, prompt, sampling).flatten())
    assert not far_in_the_tail(statistic, dof), (statistic, dof)
    drafted = sum(row.drafted for row in batch.draft_counts)
    acceptance = sum(row.accepted for row in batch.draft_counts) / drafted
    assert 0.1 < acceptance < 0.9  # both branches of the verification ran
    for prompt_ids, completion, logprobs in zip(batch.prompt_ids[:50], batch.completion_ids, batch.sampler_logprobs,
                                                strict=False):  # fmt: skip
        with torch.no_grad():
            logits = small_vocab_policy(torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 : -1]
        expected = processed_logprobs(logits, **sampling)[0].gather(-1, torch.tensor(completion).unsqueeze(-1))
        assert torch.allclose(logprobs, expected.squeeze(-1), atol=1e-5)


@pytest.fixture(scope="module")
def sharp_policy() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset_config("tiny-debug")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    return model


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_the_same_with_and_without_speculation(sharp_policy, k) -> None:
    tokenizer = word_tokenizer(sharp_policy.config.vocab_size)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=14, stop_token_ids=(21, 11),
                            stop_strings=("t123 t122",), record_routing=True, record_kept_tokens=True)  # fmt: skip
    plain = TorchRolloutEngine(sharp_policy, tokenizer, max_batch_rows=4).generate(PROMPTS, params)
    fast = TorchRolloutEngine(sharp_policy, tokenizer, max_batch_rows=4, num_speculative_tokens=k)
    speculative = fast.generate(PROMPTS, params)
    assert speculative.completion_ids == plain.completion_ids
    assert speculative.finish_reason == plain.finish_reason
    assert [len(ids) for ids in plain.completion_ids[::2]] == [5, 8, 4]  # stop tokens and a stop string
    for a, b in zip(speculative.sampler_logprobs, plain.sampler_logprobs, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    for a, b in zip(speculative.routed_experts, plain.routed_experts, strict=True):
        assert torch.equal(a, b)
    assert all(len(sets) == len(ids) for sets, ids in zip(speculative.kept_tokens, speculative.completion_ids,
                                                          strict=True))  # fmt: skip
    assert plain.draft_counts is None
    assert all(row.drafted == k * row.rounds for row in speculative.draft_counts)


def test_the_trainer_replays_speculative_rollouts_exactly(sharp_policy) -> None:
    """Routing and kept sets recorded in speculative rounds reproduce the sampler's log-probs in a trainer whose
    routers would choose other experts."""
    engine = TorchRolloutEngine(sharp_policy, word_tokenizer(sharp_policy.config.vocab_size), max_batch_rows=6,
                                num_speculative_tokens=2)  # fmt: skip
    params = SamplingParams(n=3, temperature=1.0, top_p=0.8, top_k=20, max_new_tokens=12, seed=1,
                            stop_token_ids=(7, 9, 11), record_routing=True, record_kept_tokens=True)  # fmt: skip
    rollout = engine.generate(PROMPTS, params)
    assert sum(row.accepted for row in rollout.draft_counts) > 0
    batch = build_policy_batch(rollout, PAD)
    trainer = copy.deepcopy(sharp_policy)
    generator = torch.Generator().manual_seed(0)
    for router in trainer.routers():
        router.e_score_correction_bias.add_(5 * torch.randn(router.num_experts, generator=generator))
    with torch.no_grad():
        logp = TokenLogprobModel(trainer)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                          batch.prompt_length, routed_experts=batch.routed_experts,
                                          kept_tokens=batch.kept_tokens).logp  # fmt: skip
    assert ((logp - batch.sampler_logprobs).abs() * batch.completion_mask).max() < 1e-4


def test_a_fixed_seed_reproduces_a_speculative_batch(sharp_policy) -> None:
    engine = TorchRolloutEngine(sharp_policy, word_tokenizer(sharp_policy.config.vocab_size),
                                num_speculative_tokens=2)  # fmt: skip
    params = SamplingParams(n=4, max_new_tokens=10, seed=3)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert first.completion_ids == again.completion_ids
    assert len({tuple(ids) for ids in first.completion_ids}) > 1


def test_speculation_needs_mtp_modules() -> None:
    with pytest.raises(ValueError, match="MTP"):
        TorchRolloutEngine(tiny_llama(), word_tokenizer(128), num_speculative_tokens=1)
    no_mtp = DeepseekV3ForCausalLM(preset_config("tiny-debug", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        TorchRolloutEngine(no_mtp, word_tokenizer(no_mtp.config.vocab_size), num_speculative_tokens=1)
    with pytest.raises(ValueError, match=">= 0"):
        TorchRolloutEngine(no_mtp, word_tokenizer(no_mtp.config.vocab_size), num_speculative_tokens=-1)


def test_one_token_completions_need_no_round(sharp_policy) -> None:
    engine = TorchRolloutEngine(sharp_policy, word_tokenizer(sharp_policy.config.vocab_size),
                                num_speculative_tokens=2)  # fmt: skip
    batch = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=1, seed=0))
    assert all(len(ids) == 1 for ids in batch.completion_ids)
    assert all(row.rounds == 0 for row in batch.draft_counts)
