import pytest
import torch

from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.sampling import draw, inverse_cdf, sample_next_tokens, truncation_mask
from tests.rollout.test_speculative import chi_square, far_in_the_tail


def top_p_kept(probs: list[float], top_p: float) -> list[bool]:
    return truncation_mask(torch.tensor([probs]).log(), top_p=top_p, top_k=0, min_p=0.0)[0].tolist()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    assert top_p_kept([0.5, 0.3, 0.15, 0.05], 0.75) == [True, True, False, False]
    assert top_p_kept([0.5, 0.3, 0.15, 0.05], 0.81) == [True, True, True, False]
    assert top_p_kept([0.5, 0.3, 0.15, 0.05], 1e-6) == [True, False, False, False]


def test_top_p_respects_the_original_token_order():
    assert top_p_kept([0.15, 0.5, 0.05, 0.3], 0.75) == [False, True, False, True]


def test_top_k_and_min_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert truncation_mask(logits, top_p=1.0, top_k=2, min_p=0.0).tolist() == [[True, True, False, False]]
    assert truncation_mask(logits, top_p=1.0, top_k=0, min_p=0.25).tolist() == [[True, True, True, False]]


def test_greedy_and_reported_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    sampled = sample_next_tokens(logits, temperature=0.0)
    assert sampled.tokens.tolist() == [1, 2]
    torch.testing.assert_close(sampled.logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 2]])
    assert sampled.kept is None


def test_logprobs_are_renormalised_over_the_nucleus():
    logits = torch.randn(64, 11)
    sampled = sample_next_tokens(logits, temperature=0.7, top_p=0.5, generator=torch.Generator().manual_seed(0))
    kept = truncation_mask(logits / 0.7, top_p=0.5, top_k=0, min_p=0.0)
    assert kept.gather(-1, sampled.tokens[:, None]).all()  # never samples outside the nucleus
    expected = torch.log_softmax((logits / 0.7).masked_fill(~kept, float("-inf")), -1)
    torch.testing.assert_close(sampled.logprobs, expected.gather(-1, sampled.tokens[:, None]).squeeze(-1))


def test_sampling_follows_the_distribution_and_is_seeded():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    draw = lambda seed: (
        sample_next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(seed)).tokens
    )
    frequencies = torch.bincount(draw(1), minlength=3) / 20000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)
    assert torch.equal(draw(2), draw(2))


def test_draws_follow_unnormalised_weights_and_never_take_a_zero_weight():
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 6.0, 0.0])
    tokens = draw(weights.expand(40000, -1), torch.Generator().manual_seed(0))
    statistic, dof = chi_square(torch.bincount(tokens, minlength=6).float(), weights / weights.sum())
    assert not far_in_the_tail(statistic, dof)  # infinite if a zero-weight index was drawn


def test_inverse_cdf_picks_the_first_index_past_the_uniform_share_of_the_mass():
    weights = torch.tensor([[0.0, 1.0, 0.0, 1.0, 2.0, 0.0]]).expand(5, -1)
    uniform = torch.tensor([0.0, 0.2499, 0.25, 0.5, 1.0], dtype=torch.float64)
    # cumulative 0 1 1 2 4 4 of total 4: u * 4 = 0 -> 1; 0.9996 -> 1; 1 -> 3 (index 2 weighs 0); 2 -> 4; 4 -> 4
    assert inverse_cdf(weights, uniform).tolist() == [1, 1, 3, 4, 4]


def test_sampling_params_and_batch_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    assert SamplingParams(top_k=-1, min_p=1.0).top_k == -1  # vLLM's "off" is accepted
    with pytest.raises(ValueError, match="completion_text has 1 rows, expected 2"):
        RolloutBatch([[1], [1]], [[2], [3]], ["a"], [torch.zeros(1)] * 2, ["stop"] * 2, policy_version=0)
