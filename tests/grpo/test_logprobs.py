import pytest
import torch
from torch import nn

from r1kit.grpo.logprobs import token_logprobs_from_hidden


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_full_log_softmax_and_its_gradient(chunk_size, temperature):
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))

    full = torch.log_softmax(head(hidden) / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    full.sum().backward()
    expected_hidden_grad, expected_head_grad = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    logp, entropy = token_logprobs_from_hidden(hidden, targets, head, temperature=temperature, chunk_size=chunk_size)
    torch.testing.assert_close(logp, full)
    logp.sum().backward()
    torch.testing.assert_close(hidden.grad, expected_hidden_grad)
    torch.testing.assert_close(head.weight.grad, expected_head_grad)

    probs = torch.softmax(head(hidden) / temperature, -1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1).detach())
    assert not entropy.requires_grad


def test_softcap_is_applied_before_temperature():
    head = nn.Linear(8, 11, bias=False)
    hidden, targets = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3))
    logits = 2.0 * torch.tanh(head(hidden) / 2.0) / 0.5
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    logp, _ = token_logprobs_from_hidden(hidden, targets, head, temperature=0.5, softcap=2.0)
    torch.testing.assert_close(logp, expected)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs_from_hidden(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), nn.Linear(4, 5))
