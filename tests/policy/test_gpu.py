"""CUDA paths: grouped_mm experts in bf16 and bf16 decoding with the latent cache (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.moe import ExpertLayout, _grouped_mm_applies, grouped_linear, padded_bmm_linear
from r1kit.policy.transformers_compat import CACHE_NAME

pytestmark = pytest.mark.gpu


def test_grouped_mm_runs_the_cuda_bf16_experts():
    x = torch.randn(40, 32, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(8, 48, 32, device="cuda", dtype=torch.bfloat16)
    layout = ExpertLayout.from_topk(torch.randint(0, 6, (20, 2), device="cuda"), 8)  # experts 6, 7 idle
    assert _grouped_mm_applies(x, weight)
    torch.testing.assert_close(
        grouped_linear(x, weight, layout).float(),
        padded_bmm_linear(x, weight, layout).float(),
        rtol=2e-2,
        atol=2e-2,
    )


def test_bf16_latent_decoding_follows_the_full_forward(tiny_config, randomized):
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    randomized(model)
    model.to("cuda", torch.bfloat16)
    assert model.routers()[0].e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, 128, (4, 12), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.float()
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: getattr(out, CACHE_NAME)})
            steps.append(out.logits[:, -1])
    error = (torch.stack(steps, 1).float() - full[:, 7:]).abs().max() / full.abs().max()
    assert error < 0.05, error  # bf16 rounding differs between the paths; a wrong cache is off by O(1)
