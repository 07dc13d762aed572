"""Importance-sampling corrections equal a token-by-token transcription of their definitions; config checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.importance import IS_CORRECTIONS
from r1kit.grpo.options import ConfigError

CAP, BOUNDS = 1.5, (0.6, 1.4)


def mismatched_logprobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old, sampler, mask), (6, 7) float64: ratios spread well past both bounds, padded rows of 1..7 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 6, 3, 7])
    mask = (torch.arange(7)[None] < lengths[:, None]).double()
    sampler = -3 * torch.rand(6, 7, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 0.6, -0.6, 0.2, 0.05], dtype=torch.float64)[:, None]  # whole sequences off
    old = sampler + shift + 0.4 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    return old * mask, sampler * mask, mask


def transcription(name: str, old, sampler, mask, cap: float, low: float, high: float):
    """(weights on the completion tokens, keep), written out completion by completion, token by token."""
    weights, keep = {}, []
    for i in range(mask.shape[0]):
        tokens = [t for t in range(mask.shape[1]) if mask[i, t] == 1]
        rho = {t: math.exp(old[i, t].item() - sampler[i, t].item()) for t in tokens}
        product, geometric_mean = math.prod(rho.values()), math.prod(rho.values()) ** (1 / len(tokens))
        keep.append(1.0)
        for t in tokens:
            if name == "none" or name == "sequence_mis":
                weights[i, t] = 1.0
            elif name == "token_tis":
                weights[i, t] = min(rho[t], cap)
            elif name == "sequence_tis":
                weights[i, t] = min(product, cap)
            elif name in ("token_mis", "icepop"):
                weights[i, t] = rho[t] if low <= rho[t] <= high else 0.0
        if name == "sequence_mis" and not low <= geometric_mean <= high:
            keep[-1] = 0.0
    return weights, keep


@pytest.mark.parametrize("name", ["none", "token_tis", "sequence_tis", "token_mis", "icepop", "sequence_mis"])
def test_each_correction_equals_its_transcription(name):
    old, sampler, mask = mismatched_logprobs()
    weights, keep = IS_CORRECTIONS[name](old, sampler, mask, cap=CAP, bounds=BOUNDS)
    expected_weights, expected_keep = transcription(name, old, sampler, mask, CAP, *BOUNDS)
    assert keep.tolist() == expected_keep
    if weights is None:
        assert set(expected_weights.values()) == {1.0}
        return
    assert weights.shape == mask.shape
    for (i, t), value in expected_weights.items():
        assert weights[i, t].item() == pytest.approx(value, rel=1e-12), (i, t)


def test_the_inputs_reach_every_case():
    """The transcription test is only as good as its data: bounds and cap bind somewhere, not everywhere."""
    old, sampler, mask = mismatched_logprobs()
    ratio = torch.exp(old - sampler)[mask.bool()]
    assert (ratio > CAP).any() and (ratio < BOUNDS[0]).any() and ((ratio > BOUNDS[0]) & (ratio < BOUNDS[1])).any()
    _, keep = IS_CORRECTIONS["sequence_mis"](old, sampler, mask, cap=CAP, bounds=BOUNDS)
    assert 0 < keep.sum() < len(keep)
    weights, _ = IS_CORRECTIONS["sequence_tis"](old, sampler, mask, cap=CAP, bounds=BOUNDS)
    assert (weights[:, 0] == CAP).any() and (weights[:, 0] < CAP).any()


def test_icepop_is_token_masked_importance_sampling():
    assert IS_CORRECTIONS["icepop"] is IS_CORRECTIONS["token_mis"]


def test_token_tis_and_sequence_mis_on_a_hand_worked_case():
    """The default is token_tis with cap 2; sequence_mis with bounds [1/t, t] bounds the geometric mean by t."""
    old = torch.log(torch.tensor([[1.0, 4.0], [1.0, 1.0]]))
    sampler = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights, keep = IS_CORRECTIONS["token_tis"](old, sampler, mask, cap=2.0, bounds=(0.5, 2.0))
    assert weights.tolist() == [[1.0, 2.0], [1.0, 1.0]] and keep.tolist() == [1.0, 1.0]
    weights, keep = IS_CORRECTIONS["sequence_mis"](old, sampler, mask, cap=2.0, bounds=(1 / 1.5, 1.5))
    assert weights is None and keep.tolist() == [0.0, 1.0]  # row 0: exp(mean(0, log 4)) = 2 > 1.5
    config = GRPOConfig()
    assert (config.importance_correction, config.importance_cap) == ("token_tis", 2.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"importance_correction": "tis"}, "unknown importance correction 'tis'; known: ['icepop', 'none'"),
        ({"kl_estimator": "k2"}, "unknown KL estimator 'k2'; known: ['k3', 'k3_unbiased']"),
        ({"objective": "ppo"}, "unknown objective 'ppo'; known: ['cispo', 'gmpo', 'grpo', 'gspo', 'sapo']"),
        ({"importance_cap": 0.0}, "importance_cap must be > 0, got 0.0"),
        ({"importance_bounds": [2.0, 0.5]}, "importance_bounds must be low high with 0 <= low < 1 < high"),
        ({"importance_bounds": [0.5]}, "importance_bounds must be low high"),
        ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold must be >= 0, got -0.1"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be > 0"),
        ({"epsilon": 0.0}, "epsilon must be > 0, got 0.0"),
    ],
)
def test_config_refuses_unknown_names_and_bad_values(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GRPOConfig(**settings)
