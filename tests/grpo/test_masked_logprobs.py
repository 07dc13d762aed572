"""Trainer log-probs under the sampler's kept sets: the renormalised truncated distribution."""

import pytest
import torch
from torch import nn

from r1kit.grpo.logprobs import token_logprobs_from_hidden
from r1kit.rollout.sampling import sample_next_tokens
from r1kit.rollout.token_sets import TokenSets

N, T, H, V = 3, 7, 16, 50


def kept_mask(seed: int) -> torch.Tensor:
    """(N * T, V): random kept sets holding the target, every third position unrestricted."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(N * T, V, generator=generator) < 0.4
    mask[::3] = True
    return mask


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize(("temperature", "softcap"), [(1.0, None), (0.7, 3.0)])
def test_masked_logprobs_equal_a_masked_log_softmax_and_its_gradient(chunk_size, temperature, softcap):
    torch.manual_seed(0)
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, T, H, requires_grad=True)
    mask = kept_mask(seed=1)
    targets = torch.multinomial(mask.float(), 1).view(N, T)  # a target always lies in its kept set

    logits = head(hidden).view(N * T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = (logits / temperature).masked_fill(~mask, float("-inf"))
    full = torch.log_softmax(logits, -1)
    expected = full.gather(-1, targets.view(-1, 1)).view(N, T)
    expected.sum().backward()
    expected_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    kept = TokenSets.from_mask(mask)
    logp, entropy = token_logprobs_from_hidden(
        hidden, targets, head, temperature=temperature, chunk_size=chunk_size, softcap=softcap, kept=kept
    )
    torch.testing.assert_close(logp, expected)
    logp.sum().backward()
    torch.testing.assert_close(hidden.grad, expected_grads[0])
    torch.testing.assert_close(head.weight.grad, expected_grads[1])
    probs = full.exp()
    expected_entropy = -(probs * full.masked_fill(~mask, 0.0)).sum(-1).view(N, T)
    torch.testing.assert_close(entropy, expected_entropy.detach())
    assert entropy.isfinite().all() and not entropy.requires_grad


def test_unrestricted_positions_equal_the_unmasked_computation():
    head = nn.Linear(H, V, bias=False)
    hidden, targets = torch.randn(N, T, H), torch.randint(0, V, (N, T))
    plain = token_logprobs_from_hidden(hidden, targets, head, chunk_size=4)
    for kept in (TokenSets.unrestricted(N * T), TokenSets.from_mask(kept_mask(seed=2))):
        logp, entropy = token_logprobs_from_hidden(hidden, targets, head, chunk_size=4, kept=kept)
        free = (kept.sizes == 0).view(N, T)
        assert torch.equal(logp[free], plain[0][free]) and torch.equal(entropy[free], plain[1][free])


def test_the_trainer_reproduces_the_samplers_truncated_logprobs():
    """Kept sets from the sampler, laid out on the right-padded grid, make the trainer's log-probs the sampler's."""
    torch.manual_seed(3)
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, T, H)
    lengths = [T, 4, 1]
    sampled = sample_next_tokens(
        head(hidden).view(N * T, V), temperature=0.8, top_p=0.8, top_k=10, min_p=0.02, return_kept=True
    )
    rows = sampled.kept.split([T] * N)
    grid = TokenSets.grid([row.slice(0, length) for row, length in zip(rows, lengths, strict=True)], T)
    logp, _ = token_logprobs_from_hidden(
        hidden, sampled.tokens.view(N, T), head, temperature=0.8, chunk_size=5, kept=grid
    )
    valid = torch.arange(T) < torch.tensor(lengths)[:, None]  # (N, T)
    torch.testing.assert_close(logp[valid], sampled.logprobs.view(N, T)[valid])
    assert (logp[~valid] < sampled.logprobs.view(N, T)[~valid] + 1e-6).all()  # padding: the full distribution


def test_kept_must_cover_every_position():
    with pytest.raises(ValueError, match="expected N \\* T = 6"):
        token_logprobs_from_hidden(
            torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), nn.Linear(4, 5), kept=TokenSets.unrestricted(5)
        )
