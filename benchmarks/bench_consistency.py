"""Sampler/trainer consistency: how far the trainer's log-probs are from the sampler's, and why.

The importance ratio of GRPO compares the trainer's log-probs of the sampled
tokens with the sampler's. This benchmark samples completions with the built-in
torch engine (KV-cache decode, one token per forward) and recomputes their
log-probs with the trainer's full-sequence forward (`TokenLogprobModel`) on the
same weights, in fp32, bf16 and both with FP8 GEMMs, and prints for every
combination of DeepSeek-V3.2's two stabilisers:

  - keep routing: the trainer replays the experts the sampler chose;
  - keep sampling mask: the trainer renormalises over the sampler's top-k/top-p kept sets;

and for both MLA decode paths of the engine (absorbed: fast, latent-space
attention; expanded: the training forward's arithmetic), the mean, p99 and
max |log p_trainer - log p_sampler| over completion tokens, a k3 estimate of
KL(sampler || trainer) (mean of r - 1 - log r, r = p_trainer / p_sampler, on
the sampler's tokens), and the share of (token, MoE layer) pairs
whose expert set the trainer's routers would choose differently from the
sampler's (routing flips; 0 by construction under keep routing). Without keep
sampling mask the sampler's log-prob is under the truncated, renormalised
distribution and the trainer's under the full one, so the gap includes
log(mass of the kept set): the importance weight that corrects for truncation.

Policy: the tiny-debug DeepSeek-V3 over the embedded task's tokenizer, with
weights drawn far from init (std 0.3; norm gains around 1; routing biases
non-zero), so that its next-token distributions are peaked and its routing
is sensitive, as a trained model's; prompts: the task's arithmetic questions.

    python3 -m benchmarks.bench_consistency [--prompts 16 --samples 4 --max-new-tokens 48]
                                            [--top-p 0.8 --top-k 20 --min-p 0 --temperature 1.0]
"""

from __future__ import annotations

import argparse
import copy

import torch

from r1kit.grpo.batch import PolicyBatch, build_policy_batch
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.policy import DeepseekV3ForCausalLM
from r1kit.policy.modeling import MLA_DECODE_PATHS
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rollout.engine import SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine

PRECISIONS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp32 + FP8": (torch.float32, True),
    "bf16 + FP8": (torch.bfloat16, True),
}


def far_from_init(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Weights ~ N(0, 0.3^2), norm gains ~ N(1, 0.1^2), routing biases ~ N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                gain = "norm" in name and "e_score" not in name
                tensor.copy_(1 + 0.1 * noise if gain else (0.1 if "e_score" in name else 0.3) * noise)


def policy_in(base: DeepseekV3ForCausalLM, dtype: torch.dtype, fp8: bool) -> DeepseekV3ForCausalLM:
    model = copy.deepcopy(base).to(dtype).eval()
    if fp8:
        model.enable_fp8()
    return model


def routing_flips(model: DeepseekV3ForCausalLM, batch: PolicyBatch) -> float:
    """Share of recorded (layer, token) expert sets the model's own routers would not choose."""
    with torch.no_grad():
        chosen = model.model(batch.input_ids, batch.attention_mask, batch.position_ids,
                             output_routed_experts=True).routed_experts  # fmt: skip
    recorded = batch.routed_experts
    valid = recorded[..., 0] >= 0  # (layers, N, P + T): tokens the sampler read
    differs = (chosen.sort(dim=-1).values != recorded.sort(dim=-1).values).any(dim=-1)
    return (differs & valid).sum().item() / valid.sum().item()


def mismatch(trainer: TokenLogprobModel, batch: PolicyBatch, keep_routing: bool, keep_mask: bool) -> dict:
    with torch.no_grad():
        logp = trainer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_length,
                       routed_experts=batch.routed_experts if keep_routing else None,
                       kept_tokens=batch.kept_tokens if keep_mask else None).logp  # fmt: skip
    mask = batch.completion_mask.bool()
    gap = (logp - batch.sampler_logprobs)[mask]
    return {
        "mean": gap.abs().mean().item(),
        "p99": gap.abs().quantile(0.99).item(),
        "max": gap.abs().max().item(),
        "kl": (gap.exp() - 1 - gap).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = arithmetic_dataset(args.prompts, seed=args.seed)
    tokenizer = task_tokenizer(arithmetic_dataset(300, seed=0))
    torch.manual_seed(args.seed)
    base = embedded_policy(tokenizer, "tiny-debug")
    far_from_init(base, args.seed)
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    params = SamplingParams(
        n=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, record_routing=True, record_kept_tokens=True,
    )  # fmt: skip
    truncated = args.top_p < 1 or args.top_k > 0 or args.min_p > 0  # otherwise keep sampling mask changes nothing
    print(f"tiny-debug DeepSeek-V3 (weights far from init), {args.prompts} prompts x {args.samples} samples, "
          f"<= {args.max_new_tokens} tokens, T={args.temperature}, top_p={args.top_p}, top_k={args.top_k}, "
          f"min_p={args.min_p}")  # fmt: skip
    print("|Δ log p| = |log p_trainer - log p_sampler| in nats over completion tokens; "
          "KL = k3 estimate of KL(sampler || trainer)")  # fmt: skip
    header = f"{'precision':12s} {'MLA decode':>10s} {'keep routing':>12s} {'keep mask':>10s} {'mean':>10s}"
    print(f"{header} {'p99':>10s} {'max':>10s} {'KL':>10s} {'routing flips':>14s}")
    for name, (dtype, fp8) in PRECISIONS.items():
        for decode in MLA_DECODE_PATHS:
            model = policy_in(base, dtype, fp8)
            model.set_mla_decode(decode)
            rollout = TorchRolloutEngine(model, tokenizer).generate(prompts, params)
            batch = build_policy_batch(rollout, tokenizer.pad_token_id)
            flips = routing_flips(model, batch)
            trainer = TokenLogprobModel(model, temperature=args.temperature)
            for keep_routing in (False, True):
                for keep_mask in (False, True) if truncated else (False,):
                    stats = mismatch(trainer, batch, keep_routing, keep_mask)
                    shown_flips = 0.0 if keep_routing else flips
                    numbers = " ".join(f"{stats[key]:10.2e}" for key in ("mean", "p99", "max", "kl"))
                    print(f"{name:12s} {decode:>10s} {keep_routing!s:>12s} {keep_mask!s:>10s} {numbers} "
                          f"{shown_flips:14.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
