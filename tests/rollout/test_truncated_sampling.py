"""The sampler's truncation and log-probs against a transcription of vLLM's V1 sampler."""

import pytest
import torch

from r1kit.rollout.sampling import sample_next_tokens, truncation_mask

VOCAB = 100


def vllm_processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float):
    """vLLM V1's processed_logprobs, line by line: Sampler.apply_temperature, MinPLogitsProcessor.apply,
    apply_top_k_top_p (the sorting path), then log_softmax. top_k 0 and top_p 1 are off (None there)."""
    logits = logits.to(torch.float32).clone()
    logits.div_(temperature)
    if min_p:
        probability_values = torch.nn.functional.softmax(logits, dim=-1)
        max_probabilities = torch.amax(probability_values, dim=-1, keepdim=True)
        adjusted_min_p = max_probabilities.mul_(min_p)
        invalid_token_mask = probability_values < adjusted_min_p
        logits[invalid_token_mask] = -float("inf")
    if top_k or top_p < 1:
        logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
        if top_k:
            k = torch.full((logits.shape[0],), top_k)
            top_k_mask = logits_sort.size(1) - k.to(torch.long)
            top_k_mask = logits_sort.gather(1, top_k_mask.unsqueeze(dim=1))
            top_k_mask = logits_sort < top_k_mask
            logits_sort.masked_fill_(top_k_mask, -float("inf"))
        if top_p < 1:
            p = torch.full((logits.shape[0],), top_p)
            probs_sort = logits_sort.softmax(dim=-1)
            probs_sum = torch.cumsum(probs_sort, dim=-1, out=probs_sort)
            top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
            top_p_mask[:, -1] = False
            logits_sort.masked_fill_(top_p_mask, -float("inf"))
        logits = logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)
    return logits.log_softmax(dim=-1, dtype=torch.float32)


def random_logits(rows: int, seed: int, scale: float = 2.5) -> torch.Tensor:
    return scale * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


SETTINGS = [  # (top_p, top_k, min_p)
    (0.8, 20, 0.0),
    (0.8, 0, 0.0),
    (1.0, 20, 0.0),
    (1.0, 0, 0.05),
    (0.9, 30, 0.02),
    (0.5, 5, 0.3),
]


@pytest.mark.parametrize(("top_p", "top_k", "min_p"), SETTINGS)
def test_logprobs_and_kept_sets_equal_vllms_processed_logprobs(top_p, top_k, min_p):
    logits, temperature = random_logits(256, seed=0), 0.7
    sampled = sample_next_tokens(
        logits,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        generator=torch.Generator().manual_seed(1),
        return_kept=True,
    )
    expected = vllm_processed_logprobs(logits, temperature, top_p, top_k, min_p)  # (R, V)
    torch.testing.assert_close(sampled.logprobs, expected.gather(-1, sampled.tokens[:, None]).squeeze(-1))
    kept = sampled.kept.to_mask(VOCAB)
    assert torch.equal(kept, expected.isfinite())
    assert kept.gather(-1, sampled.tokens[:, None]).all()  # never a token outside the kept set
    assert not kept.all()  # the settings do cut something


def test_no_truncation_reports_the_tempered_log_softmax():
    logits = random_logits(64, seed=2)
    for top_k in (0, -1, VOCAB, VOCAB + 5):
        assert truncation_mask(logits, top_p=1.0, top_k=top_k, min_p=0.0) is None
        sampled = sample_next_tokens(logits, temperature=0.7, top_k=top_k, return_kept=True)
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, sampled.tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(sampled.logprobs, expected)
        assert sampled.kept.ids.numel() == 0 and len(sampled.kept) == 64
    assert sample_next_tokens(logits, temperature=0.7, top_p=0.5).kept is None  # only when asked


def test_greedy_ignores_truncation_and_reports_untempered_logprobs():
    logits = random_logits(8, seed=3)
    sampled = sample_next_tokens(logits, temperature=0.0, top_p=0.1, top_k=2, min_p=0.5, return_kept=True)
    assert torch.equal(sampled.tokens, logits.argmax(-1))
    torch.testing.assert_close(sampled.logprobs, torch.log_softmax(logits, -1).max(-1).values)
    assert sampled.kept.to_mask(VOCAB).all()


def test_frequencies_follow_the_truncated_renormalised_distribution():
    draws, temperature, top_p, top_k = 40_000, 0.8, 0.8, 20
    logits = random_logits(1, seed=4, scale=1.0).expand(draws, VOCAB)
    sampled = sample_next_tokens(
        logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=torch.Generator().manual_seed(5)
    )
    probs = vllm_processed_logprobs(logits[:1], temperature, top_p, top_k, 0.0).exp()[0]  # (V,)
    frequencies = torch.bincount(sampled.tokens, minlength=VOCAB) / draws
    assert frequencies[probs == 0].sum() == 0
    assert 3 < (probs > 0).sum() < top_k  # several tokens share the mass, and top-p cuts into the top 20
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)
    # Pearson's chi-square over the kept tokens; 3x the degrees of freedom is far in the tail
    kept = probs > 0
    chi_square = ((frequencies[kept] - probs[kept]) ** 2 / probs[kept]).sum() * draws
    assert chi_square < 3 * (int(kept.sum()) - 1)


def test_importance_weight_against_the_full_distribution_is_the_kept_mass():
    """With truncation, q = p / Z on the kept set K (Z = p(K)), so p(x) / q(x) = Z for every sampled x, and
    E_q[(p / q) f] = E_p[f 1_K]: the reported log-probs weigh samples exactly by what truncation removed."""
    logits, temperature = random_logits(512, seed=6), 1.0
    sampled = sample_next_tokens(
        logits, temperature=temperature, top_p=0.7, generator=torch.Generator().manual_seed(7), return_kept=True
    )
    full = torch.log_softmax(logits / temperature, -1)  # (R, V)
    kept = sampled.kept.to_mask(VOCAB)
    kept_mass = full.exp().masked_fill(~kept, 0).sum(-1)  # Z per row
    weights = (full.gather(-1, sampled.tokens[:, None]).squeeze(-1) - sampled.logprobs).exp()
    torch.testing.assert_close(weights, kept_mass)
    assert (kept_mass < 1).all() and (kept_mass >= 0.7 - 1e-5).all()

    # Monte Carlo on one row: the importance-weighted mean of f is E_p[f on K], not E_p[f]
    draws = 50_000
    row = logits[:1].expand(draws, VOCAB)
    many = sample_next_tokens(row, temperature=temperature, top_p=0.7, generator=torch.Generator().manual_seed(8))
    f = torch.linspace(-1.0, 2.0, VOCAB)
    weight = (full[0, many.tokens] - many.logprobs).exp()
    estimate = (weight * f[many.tokens]).mean()
    torch.testing.assert_close(estimate, (full[0].exp() * f * kept[0]).sum(), atol=0.02, rtol=0)
