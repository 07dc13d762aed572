"""The loss against line-by-line transcriptions of the papers' formulas."""

import math

import pytest
import torch

from r1kit.grpo.loss import grpo_loss, k3_kl


def random_inputs(n=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + 0.3 * torch.randn(n, t, generator=g)
    ref = logp + 0.5 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    return logp, old, ref, adv, mask


def paper_grpo_objective(logp, old, ref, adv, mask, eps_low, eps_high, beta):
    """DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t {min(rho A, clip(rho) A) - beta D_KL}, as loops."""
    total = 0.0
    n = len(logp)
    for i in range(n):
        length = int(mask[i].sum())
        seq = 0.0
        for t in range(length):
            rho = math.exp(logp[i][t] - old[i][t])
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            ratio_ref = math.exp(ref[i][t]) / math.exp(logp[i][t])
            kl = ratio_ref - math.log(ratio_ref) - 1
            seq += surrogate - beta * kl
        total += seq / length
    return total / n


@pytest.mark.parametrize("eps_low,eps_high,beta", [(0.2, 0.2, 0.04), (0.2, 0.28, 0.0), (0.1, 0.3, 0.5)])
def test_grpo_loss_equals_paper_formula(eps_low, eps_high, beta):
    logp, old, ref, adv, mask = random_inputs()
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high)
    expected = -paper_grpo_objective(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask, eps_low, eps_high, beta
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_token_mean_and_constant_aggregations():
    logp, old, _, adv, mask = random_inputs()
    ratio = torch.exp(logp - old)
    per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    token_mean = grpo_loss(logp, old, adv, mask, beta=0.0, aggregation="token_mean").loss
    torch.testing.assert_close(token_mean, (per_token * mask).sum() / mask.sum())
    constant = grpo_loss(logp, old, adv, mask, beta=0.0, aggregation="constant", max_length=20).loss
    torch.testing.assert_close(constant, (per_token * mask).sum() / (len(logp) * 20))


def test_gspo_uses_sequence_level_ratio():
    logp, old, _, adv, mask = random_inputs()
    eps = 0.05
    expected = 0.0
    for i in range(len(logp)):
        length = int(mask[i].sum())
        s = math.exp(sum(logp[i, :length] - old[i, :length]).item() / length)
        expected += -min(s * adv[i].item(), min(max(s, 1 - eps), 1 + eps) * adv[i].item())
    out = grpo_loss(logp, old, adv, mask, beta=0.0, objective="gspo", epsilon_low=eps, epsilon_high=eps)
    assert out.loss.item() == pytest.approx(expected / len(logp), rel=1e-5)


def test_k3_is_unbiased_nonnegative_kl_estimate():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(50, generator=g), 0)
    q = torch.softmax(torch.randn(50, generator=g), 0)
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[samples], q.log()[samples])
    assert (estimate >= 0).all()
    assert estimate.mean().item() == pytest.approx(exact.item(), rel=0.02)


def test_on_policy_gradient_is_advantage_weighted_logp_gradient():
    """With old == logp (detached) and beta = 0 the loss gradient is -A * grad(logp) / (|o| G)."""
    logp, _, _, adv, mask = random_inputs()
    logp = logp.clone().requires_grad_(True)
    grpo_loss(logp, logp.detach(), adv, mask, beta=0.0).loss.backward()
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / len(adv)
    torch.testing.assert_close(logp.grad, expected)


def test_clip_statistics_and_importance_weights():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    pos = grpo_loss(logp, old, torch.tensor([1.0]), mask, beta=0.0)
    assert pos.clip_high.item() == pytest.approx(1 / 3) and pos.clip_low.item() == 0
    neg = grpo_loss(logp, old, torch.tensor([-1.0]), mask, beta=0.0)
    assert neg.clip_low.item() == pytest.approx(1 / 3) and neg.clip_high.item() == 0
    half = torch.full((1, 3), 0.5)
    weighted = grpo_loss(logp, old, torch.tensor([1.0]), mask, beta=0.0, importance_weights=half)
    torch.testing.assert_close(weighted.loss, pos.loss * 0.5)


def test_micro_batch_normalizers_reproduce_full_batch():
    logp, old, ref, adv, mask = random_inputs(n=8)
    for aggregation in ("sequence_mean", "token_mean", "constant"):
        kwargs = dict(ref_logp=ref, beta=0.1, aggregation=aggregation, max_length=7)
        full = grpo_loss(logp, old, adv, mask, **kwargs).loss
        parts = sum(
            grpo_loss(
                logp[s],
                old[s],
                adv[s],
                mask[s],
                num_sequences=8.0,
                num_tokens=mask.sum().item(),
                **{**kwargs, "ref_logp": ref[s]},
            ).loss
            for s in (slice(0, 3), slice(3, 8))
        )
        torch.testing.assert_close(parts, full)


def test_beta_needs_reference_and_unknown_names_raise():
    logp, old, _, adv, mask = random_inputs()
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo_loss(logp, old, adv, mask, beta=0.0, aggregation="median")
