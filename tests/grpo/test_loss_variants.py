"""CISPO, SAPO, GMPO, the V3.2 KL and off-policy mask: each equals its paper's formula written out, and TRL.

Transcriptions go completion by completion and token by token on scalars, as the
papers write them; autograd through them gives the reference gradients. The TRL
tests run TRL 1.16's own `GRPOTrainer._compute_loss` on a stand-in trainer
whose forward returns given log-probs (no model), and compare loss and gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.loss import KL_ESTIMATORS, OBJECTIVES, TrustRegion, grpo_loss, k3_kl, off_policy_sequence_mask

SCALARS = {"epsilon_low": 0.2, "epsilon_high": 0.28, "temperature_pos": 1.0, "temperature_neg": 1.05}


@dataclasses.dataclass
class Inputs:
    """N = 6 completions of up to T = 5 tokens, float64, mixed-sign advantages (one zero)."""

    logp: Tensor  # leaf, requires grad
    old: Tensor
    ref: Tensor
    sampler: Tensor
    advantages: Tensor
    mask: Tensor

    def tokens(self, i: int) -> list[int]:
        return [t for t in range(self.mask.shape[1]) if self.mask[i, t] == 1]


def random_inputs(seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).double()
    logp = -2 * torch.rand(6, 5, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.5, -0.5, 0.3, -0.3, 0.0, 0.1], dtype=torch.float64)[:, None]
    old = logp + shift + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    sampler = old + torch.tensor([0.0, 0.4, 0.0, 0.6, 0.2, -0.4], dtype=torch.float64)[:, None]
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.2, 0.0, -0.3], dtype=torch.float64)
    return Inputs(logp.requires_grad_(), old * mask, ref * mask, sampler * mask, advantages, mask)


def per_token(objective: str, x: Inputs, **scalars) -> tuple[Tensor, Tensor]:
    """The registered objective's masked per-token loss and its gradient with respect to logp."""
    loss, _ = OBJECTIVES[objective](x.logp, x.old, x.advantages, x.mask, TrustRegion(**{**SCALARS, **scalars}))
    loss = loss * x.mask
    (grad,) = torch.autograd.grad(loss.sum(), x.logp)
    return loss.detach(), grad


def written_out(x: Inputs, token_loss) -> tuple[Tensor, Tensor]:
    """token_loss(i, t) -> 0-dim loss of token t of completion i (autograd through x.logp), as an (N, T) table."""
    rows = []
    for i in range(x.mask.shape[0]):
        zero = x.logp[i, 0] * 0
        rows.append(torch.stack([token_loss(i, t) if x.mask[i, t] == 1 else zero for t in range(x.mask.shape[1])]))
    loss = torch.stack(rows)
    (grad,) = torch.autograd.grad(loss.sum(), x.logp)
    return loss.detach(), grad


def test_cispo_is_the_clipped_stop_gradient_weight_times_log_prob():
    """MiniMax-M1: J = sum sg(r_hat) A log pi, r_hat = clip(r, 1 - eps_low, 1 + eps_high)."""
    x, eps_low, eps_high = random_inputs(), SCALARS["epsilon_low"], SCALARS["epsilon_high"]

    def token_loss(i, t):
        r = math.exp(x.logp[i, t].item() - x.old[i, t].item())
        r_hat = min(max(r, 1 - eps_low), 1 + eps_high)  # a number: no gradient
        return -r_hat * x.advantages[i].item() * x.logp[i, t]

    (loss, grad), (expected, expected_grad) = per_token("cispo", x), written_out(x, token_loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    ratio = torch.exp(x.logp - x.old).detach()[x.mask.bool()]
    assert (ratio > 1 + eps_high).any() and (ratio < 1 - eps_low).any()  # both bounds bind somewhere
    # every token keeps a gradient, clipped or not (the point of CISPO), except where A = 0
    assert ((grad != 0) == (x.mask.bool() & (x.advantages != 0)[:, None])).all()


def test_sapo_is_the_soft_gate_with_sign_dependent_temperatures():
    """SAPO: J = sum f(r) A, f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau_pos if A > 0 else tau_neg."""
    x = random_inputs()

    def token_loss(i, t):
        advantage = x.advantages[i].item()
        tau = SCALARS["temperature_pos"] if advantage > 0 else SCALARS["temperature_neg"]
        r = torch.exp(x.logp[i, t] - x.old[i, t])
        return -(1 / (1 + torch.exp(-tau * (r - 1)))) * 4 / tau * advantage

    (loss, grad), (expected, expected_grad) = per_token("sapo", x), written_out(x, token_loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_sapo_gradient_is_grpo_on_policy():
    """f'(1) = 1 whatever tau: at pi_theta = pi_old, SAPO's gradient is GRPO's."""
    x = random_inputs()
    x.old = x.logp.detach().clone()
    _, sapo = per_token("sapo", x, temperature_pos=3.0, temperature_neg=0.5)
    _, grpo = per_token("grpo", x)
    torch.testing.assert_close(sapo, grpo)


def test_gmpo_is_the_geometric_mean_of_the_clipped_token_objectives():
    """GMPO: J_i = (prod_t |min(r_t A, clip(r_t, e^-eps_low, e^eps_high) A)|)^(1/|o_i|) sgn(A), on every token."""
    x, eps_low, eps_high = random_inputs(), 0.4, 0.3

    def sequence_objective(i):
        advantage = x.advantages[i].item()
        if advantage == 0:
            return x.logp[i, 0] * 0
        product = 1
        for t in x.tokens(i):
            r = torch.exp(x.logp[i, t] - x.old[i, t])
            clipped = torch.clamp(r, math.exp(-eps_low), math.exp(eps_high))
            product = product * torch.minimum(r * advantage, clipped * advantage).abs()
        return product ** (1 / len(x.tokens(i))) * math.copysign(1, advantage)

    loss, grad = per_token("gmpo", x, epsilon_low=eps_low, epsilon_high=eps_high)
    expected, expected_grad = written_out(x, lambda i, t: -sequence_objective(i))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    lengths = x.mask.sum(1, keepdim=True)  # every token carries its sequence's loss
    sequence_mean = grpo_loss(
        x.logp, x.old, x.advantages, x.mask, beta=0.0, objective="gmpo", epsilon_low=eps_low, epsilon_high=eps_high
    ).loss
    torch.testing.assert_close(sequence_mean, (expected / lengths).sum() / 6)  # the paper's 1/G sum_i
    log_ratio = (x.logp - x.old).detach()[x.mask.bool()]
    assert (log_ratio > eps_high).any() and (log_ratio < -eps_low).any()


def test_unbiased_kl_is_k3_times_the_ratio_with_its_gradient():
    """DeepSeek-V3.2: D = pi_theta / pi_old * (pi_ref / pi_theta - log(pi_ref / pi_theta) - 1)."""
    x = random_inputs()

    def token_kl(i, t):
        p_theta, p_old, p_ref = torch.exp(x.logp[i, t]), math.exp(x.old[i, t]), math.exp(x.ref[i, t])
        return p_theta / p_old * (p_ref / p_theta - torch.log(p_ref / p_theta) - 1)

    estimate = KL_ESTIMATORS["k3_unbiased"](x.logp, x.ref, x.old) * x.mask
    (grad,) = torch.autograd.grad(estimate.sum(), x.logp)
    expected, expected_grad = written_out(x, token_kl)
    torch.testing.assert_close(estimate.detach(), expected)
    torch.testing.assert_close(grad, expected_grad)
    assert KL_ESTIMATORS["k3"] is k3_kl


def test_off_policy_mask_drops_negative_advantages_far_from_the_sampler():
    """DeepSeek-V3.2 eq. 9: M_i = 0 if A_i < 0 and 1/|o_i| sum_t log(pi_sampler / pi_theta) > delta, else 1."""
    x, delta = random_inputs(), 0.25
    expected = []
    for i in range(6):
        kl = sum(x.sampler[i, t].item() - x.logp[i, t].item() for t in x.tokens(i)) / len(x.tokens(i))
        expected.append(0.0 if x.advantages[i] < 0 and kl > delta else 1.0)
    keep = off_policy_sequence_mask(x.logp, x.sampler, x.advantages, x.mask, threshold=delta)
    assert keep.tolist() == expected and 0 < sum(expected) < 6

    # in the loss: the dropped sequences leave the policy-gradient term, not the KL term or the normalisers
    settings = {"ref_logp": x.ref, "beta": 0.1, "aggregation": "token_mean"}
    masked = grpo_loss(
        x.logp, x.old, x.advantages, x.mask, sampler_logp=x.sampler, off_policy_threshold=delta, **settings
    )
    by_hand = grpo_loss(
        x.logp, x.old, x.advantages, x.mask, importance_weights=keep[:, None].expand_as(x.mask), **settings
    )
    torch.testing.assert_close(masked.loss, by_hand.loss)
    assert masked.off_policy_masked.item() == pytest.approx(1 - sum(expected) / 6)


# TRL 1.16


class Accelerator:
    """One process: gather and reduce are the identity."""

    num_processes = 1
    sync_gradients = True

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def reduce(self, tensor: Tensor, reduction: str) -> Tensor:
        return tensor


class Metrics(dict):
    """TRL's metric lists by name, created on first use."""

    def __missing__(self, key: str) -> list:
        self[key] = []
        return self[key]


def trl_loss(x: Inputs, **settings) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d logp) of TRL's `GRPOTrainer._compute_loss` on x, one process, no accumulation."""
    trl = pytest.importorskip("trl")

    def forward(*_, **__) -> tuple[Tensor, Tensor, None]:
        """TRL's log-prob forward, replaced: x.logp, zero entropies, no aux loss."""
        return x.logp, torch.zeros_like(x.logp), None

    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig) if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(**{**defaults, "steps_per_generation": 1, **settings})
    trainer = SimpleNamespace(
        args=args,
        loss_type=args.loss_type,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        top_entropy_quantile=1.0,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        accelerator=Accelerator(),
        model=SimpleNamespace(training=True),
        _metrics={"train": Metrics(), "eval": Metrics()},
        get_off_policy_mask=trl.GRPOTrainer.get_off_policy_mask,
        _get_per_token_logps_and_entropies=forward,
    )
    n, width = x.mask.shape
    inputs = {
        "prompt_ids": torch.ones(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.ones(n, width, dtype=torch.long),
        "completion_mask": x.mask,
        "advantages": x.advantages,
        "old_per_token_logps": x.old,
        "ref_per_token_logps": x.ref,
        "sampling_per_token_logps": x.sampler,
        "num_items_in_batch": x.mask.sum(),
    }
    loss = trl.GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, x.logp)
    return loss.detach(), grad


def our_loss(x: Inputs, **settings) -> tuple[Tensor, Tensor]:
    loss = grpo_loss(x.logp, x.old, x.advantages, x.mask, ref_logp=x.ref, **settings).loss
    (grad,) = torch.autograd.grad(loss, x.logp)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cispo_equals_trl(beta):
    """TRL caps the ratio at its epsilon_high E, no lower bound: ours with epsilon_low = 1, epsilon_high = E - 1."""
    x, cap = random_inputs(), 1.3
    theirs = trl_loss(x, loss_type="cispo", epsilon_high=cap, beta=beta, use_bias_correction_kl=False)
    ours = our_loss(x, objective="cispo", aggregation="token_mean", epsilon_low=1.0, epsilon_high=cap - 1, beta=beta)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_sapo_equals_trl(beta):
    x = random_inputs()
    theirs = trl_loss(
        x, loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3, beta=beta, use_bias_correction_kl=False
    )
    ours = our_loss(x, objective="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3, beta=beta)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_sapo_temperatures_default_to_trls():
    trl = pytest.importorskip("trl")
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    config = GRPOConfig()
    assert (config.sapo_temperature_pos, config.sapo_temperature_neg) == (
        defaults["sapo_temperature_pos"],
        defaults["sapo_temperature_neg"],
    )


@pytest.mark.parametrize(("loss_type", "aggregation"), [("grpo", "sequence_mean"), ("dapo", "token_mean")])
def test_unbiased_kl_equals_trls_bias_corrected_kl(loss_type, aggregation):
    x = random_inputs()
    theirs = trl_loss(x, loss_type=loss_type, beta=0.04, epsilon_high=0.28, use_bias_correction_kl=True)
    ours = our_loss(x, aggregation=aggregation, beta=0.04, epsilon_high=0.28, kl_estimator="k3_unbiased")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_off_policy_mask_equals_trls():
    """TRL compares the sampler's log-probs (vLLM's; pi_old's without vLLM) with pi_theta's, as ours does."""
    trl = pytest.importorskip("trl")
    x, delta = random_inputs(), 0.25
    theirs = trl.GRPOTrainer.get_off_policy_mask(x.advantages[:, None], x.logp, x.sampler, x.mask, delta)
    ours = off_policy_sequence_mask(x.logp, x.sampler, x.advantages, x.mask, threshold=delta)
    assert theirs.squeeze(1).tolist() == ours.tolist() and 0 < ours.sum() < 6
    theirs = trl_loss(x, loss_type="grpo", beta=0.04, off_policy_mask_threshold=delta, use_bias_correction_kl=False)
    ours = our_loss(x, beta=0.04, sampler_logp=x.sampler, off_policy_threshold=delta)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


# wired into the update


@pytest.mark.parametrize(
    "settings",
    [
        {
            "objective": "cispo",
            "epsilon": 1.0,
            "epsilon_high": 4.0,
            "aggregation": "token_mean",
            "importance_correction": "icepop",
            "importance_bounds": [0.5, 5.0],
        },
        {"objective": "sapo", "kl_estimator": "k3_unbiased", "importance_correction": "sequence_tis"},
        {
            "objective": "gmpo",
            "epsilon": 0.4,
            "off_policy_mask_threshold": 0.0,
            "importance_correction": "sequence_mis",
        },
    ],
    ids=["cispo-icepop", "sapo-k3_unbiased-sequence_tis", "gmpo-off_policy-sequence_mis"],
)
def test_a_training_step_runs_with_each_variant(make_trainer, settings):
    trainer = make_trainer(max_steps=1, **settings)
    trainer.train()
    (metrics,) = [json.loads(line) for line in (Path(trainer.config.output_dir) / "metrics.jsonl").open()]
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert 0 <= metrics["off_policy/masked_fraction"] <= 1
