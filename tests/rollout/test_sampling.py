import pytest
import torch

from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.sampling import sample_next_tokens, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logprobs, 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logprobs, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logprobs, 1e-6).isfinite().tolist() == [[True, False, False, False]]


def test_top_p_respects_the_original_token_order():
    logprobs = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    assert top_p_filter(logprobs, 0.8).isfinite().tolist() == [[False, True, False, True]]


def test_greedy_and_reported_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    tokens, logprobs = sample_next_tokens(logits, temperature=0.0, top_p=1.0)
    assert tokens.tolist() == [1, 2]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 2]])


def test_logprobs_are_temperature_scaled_and_untruncated():
    logits = torch.randn(64, 11)
    tokens, logprobs = sample_next_tokens(
        logits, temperature=0.7, top_p=0.5, generator=torch.Generator().manual_seed(0)
    )
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    kept = top_p_filter(torch.log_softmax(logits / 0.7, -1), 0.5).isfinite()
    assert kept.gather(-1, tokens[:, None]).all()  # never samples outside the nucleus


def test_sampling_follows_the_distribution_and_is_seeded():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    draw = lambda seed: sample_next_tokens(
        logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(seed)
    )[0]
    frequencies = torch.bincount(draw(1), minlength=3) / 20000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)
    assert torch.equal(draw(2), draw(2))


def test_sampling_params_and_batch_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="completion_text has 1 rows, expected 2"):
        RolloutBatch([[1], [1]], [[2], [3]], ["a"], [torch.zeros(1)] * 2, ["stop"] * 2, policy_version=0)
