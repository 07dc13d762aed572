"""Policy benchmark: latent-cache size against MHA, MoE layer and decode-step speed against transformers.

Prints, in one run:
  1. KV-cache bytes per token: our latent cache, measured after a prefill of the
     "tiny" preset, against transformers' Llama (MHA, same layers and heads,
     head_dim = v_head_dim) measured the same way; and the same ratio for the
     DeepSeek-V3 config (576 values against 2 * 128 * 128 per token and layer).
  2. Forward + backward time of our MoE layer against transformers'
     DeepseekV3MoE on the same config and weights (its default experts back end
     and "eager"), plus our layer on the padded-bmm fallback GEMM (the dispatch
     choice), for the "tiny" preset and a fine-grained 64-expert variant;
     then the expert GEMM alone on both back ends, balanced and skewed loads.
     Contestants are timed in interleaved rounds.
  3. One decode step (batch of 64, one new token after a 256-token prompt):
     our absorbed latent attention against transformers' DeepseekV3.
  4. The largest logit difference against transformers' DeepseekV3ForCausalLM
     (fp32, same random weights, dense + MoE layers, default RoPE and YaRN).

    python3 benchmarks/bench_policy.py [--threads N] [--tokens 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3ForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as HFMoE

from r1kit.policy import DeepseekV3ForCausalLM, LatentCache, preset_config
from r1kit.policy.moe import ExpertLayout, MoE, MoEOutput, RoutedExperts, grouped_mm_linear, padded_bmm_linear
from r1kit.policy.transformers_compat import CACHE_NAME

VOCAB = 512


def median_ms(contestants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each contestant, timed in interleaved rounds so load drift hits all alike."""
    for fn in contestants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}


def cache_bytes_per_token(batch: int = 4, seq: int = 64) -> None:
    config = preset_config("tiny", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (batch, seq))
    ours = DeepseekV3ForCausalLM(config).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            head_dim=config.v_head_dim,
        )
    ).eval()
    with torch.no_grad():
        latent = getattr(ours(ids, use_cache=True), CACHE_NAME)
        mha = getattr(llama(ids, use_cache=True), CACHE_NAME)
    ours_bytes = sum(latent.layer_entries(i).nbytes for i in range(latent.num_layers)) / (batch * seq)
    mha_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in mha.layers) / (batch * seq)
    print("1. KV-cache bytes per token (all layers, fp32, measured after a prefill)")
    print(
        f"   tiny preset: ours {ours_bytes:.0f} B  vs  MHA (Llama, same heads) {mha_bytes:.0f} B"
        f"  -> {mha_bytes / ours_bytes:.1f}x smaller"
    )
    v3 = preset_config("deepseek-v3")
    latent_values = v3.kv_lora_rank + v3.qk_rope_head_dim
    mha_values = 2 * v3.num_attention_heads * v3.v_head_dim
    per_token = lambda values: values * 2 * v3.num_hidden_layers / 1024  # bf16, KiB over 61 layers
    print(
        f"   DeepSeek-V3 config: {latent_values} vs {mha_values} values per token and layer; bf16, "
        f"{v3.num_hidden_layers} layers: {per_token(latent_values):.1f} KiB vs "
        f"{per_token(mha_values):.0f} KiB  -> {mha_values / latent_values:.1f}x smaller"
    )


class PaddedBmmExperts(RoutedExperts):
    """Our routed experts with the padded-bmm fallback as the expert GEMM (the dispatch comparison)."""

    def expert_linear(self, x, weight, layout):
        return padded_bmm_linear(x, weight, layout)


MOE_CONFIGS = {
    "tiny preset (8 experts, top-2 of 2 groups)": {},
    "fine-grained (64 experts, top-6 of 8 groups / 4 kept)": dict(
        n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, moe_intermediate_size=32
    ),
}


def moe_speed(tokens: int, repeats: int) -> None:
    print(f"2. MoE layer forward+backward, {tokens} tokens, training mode, median of {repeats}")
    for label, overrides in MOE_CONFIGS.items():
        config = preset_config("tiny", vocab_size=VOCAB, **overrides)
        layers = moe_contestants(config)
        x = torch.randn(8, tokens // 8, config.hidden_size)
        with torch.no_grad():
            reference = layers["ours"](x).hidden
            for name, layer in layers.items():
                out = layer(x)
                error = ((out.hidden if isinstance(layer, MoE) else out) - reference).abs().max().item()
                assert error < 1e-4, f"{name} disagrees with ours by {error}"
        times = median_ms({name: fwd_bwd(layer, x) for name, layer in layers.items()}, repeats)
        ours = times.pop("ours")
        print(f"   {label}: ours {ours:.1f} ms")
        for name, ms in times.items():
            print(f"      {name}: {ms:.1f} ms  -> ours is {ms / ours:.2f}x faster")


def moe_contestants(config) -> dict[str, torch.nn.Module]:
    """Ours, ours on the padded-bmm fallback, transformers' layer on its back ends; shared weights."""
    ours = MoE(config).train()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.05)
    padded = MoE(config).train()
    padded.experts = PaddedBmmExperts(config)
    layers = {"ours": ours, "ours with the padded-bmm fallback": padded}
    for implementation in ("default", "eager"):
        hf_config = copy.deepcopy(config)
        if implementation == "eager":
            hf_config._experts_implementation = "eager"
        model = HFDeepseekV3ForCausalLM(hf_config)  # resolves the experts back end as users get it
        name = f"transformers DeepseekV3MoE ({model.config._experts_implementation})"
        layers[name] = next(m for m in model.modules() if isinstance(m, HFMoE)).train()
    for layer in layers.values():
        layer.load_state_dict(ours.state_dict())
    return layers


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = layer(x.clone().requires_grad_())
        (out.hidden if isinstance(out, MoEOutput) else out).square().mean().backward()

    return step


def dispatch_speed(repeats: int, rows: int = 2048, top_k: int = 2) -> None:
    """One expert GEMM (tiny preset's gate_up shape), forward + backward, on balanced and skewed routing."""
    config = preset_config("tiny", vocab_size=VOCAB)
    experts, hidden = config.n_routed_experts, config.hidden_size
    x = torch.randn(rows * top_k, hidden, requires_grad=True)
    weight = torch.randn(experts, 2 * config.moe_intermediate_size, hidden, requires_grad=True)
    print(f"   expert GEMM alone ({rows} tokens x top-{top_k}, {experts} experts), forward+backward:")
    for label, skew in (("balanced", 0.0), ("skewed", 1.0)):
        logits = torch.randn(rows, experts) + skew * torch.arange(experts).float()
        layout = ExpertLayout.from_topk(logits.topk(top_k, dim=-1).indices, experts)

        def run(gemm, layout: ExpertLayout = layout) -> Callable[[], None]:
            return lambda: gemm(x, weight, layout).square().mean().backward()

        times = median_ms({"grouped_mm": run(grouped_mm_linear), "padded bmm": run(padded_bmm_linear)}, repeats)
        print(
            f"      {label} (rows per expert {layout.counts.tolist()}): "
            f"grouped_mm {times['grouped_mm']:.1f} ms, padded bmm {times['padded bmm']:.1f} ms"
        )


def decode_speed(repeats: int, batch: int = 64, prompt: int = 256) -> None:
    config = preset_config("tiny", vocab_size=VOCAB, num_nextn_predict_layers=0)
    ours = DeepseekV3ForCausalLM(config).eval()
    hf = HFDeepseekV3ForCausalLM(copy.deepcopy(config)).eval()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, VOCAB, (batch, prompt))
    new = torch.randint(0, VOCAB, (batch, 1))
    position = torch.full((batch, 1), prompt)

    def step(model: torch.nn.Module, make_cache: Callable[[], object]) -> Callable[[], None]:
        with torch.no_grad():
            prefilled = getattr(model(ids, use_cache=True, **{CACHE_NAME: make_cache()}), CACHE_NAME)

        def one_token() -> None:
            cache = copy.deepcopy(prefilled)
            with torch.no_grad():
                model(new, position_ids=position, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})

        return one_token

    times = median_ms(
        {
            "ours": step(ours, lambda: LatentCache(config.num_hidden_layers, capacity=prompt + 1)),
            "transformers": step(hf, lambda: None),
        },
        repeats,
    )
    ours_ms, hf_ms = times["ours"], times["transformers"]
    print(f"3. One decode step, batch {batch}, {prompt}-token prompt (cache copy included in both)")
    print(
        f"   ours (absorbed): {ours_ms:.1f} ms  transformers: {hf_ms:.1f} ms  -> ours is {hf_ms / ours_ms:.2f}x faster"
    )


def logit_parity() -> None:
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}
    variants = {
        "default rope, 4 groups keep 2": {},
        "YaRN, 4 groups keep 1": dict(rope_parameters=yarn, topk_group=1),
    }
    print("4. max |logit difference| against transformers (fp32, tiny-debug with 3 layers: 1 dense + 2 MoE)")
    for label, overrides in variants.items():
        config = preset_config(
            "tiny-debug",
            num_hidden_layers=3,
            num_nextn_predict_layers=0,
            max_position_embeddings=128,
            **overrides,
        )
        ours = DeepseekV3ForCausalLM(config).eval()
        with torch.no_grad():
            for name, parameter in ours.named_parameters():
                parameter.copy_(
                    1 + 0.1 * torch.randn_like(parameter) if "norm" in name else 0.3 * torch.randn_like(parameter)
                )
            for router in ours.routers():
                router.e_score_correction_bias.normal_(0, 0.1)
            theirs = HFDeepseekV3ForCausalLM(copy.deepcopy(config)).eval()
            theirs.load_state_dict(ours.state_dict())
            ids = torch.randint(0, config.vocab_size, (3, 48))
            print(f"   {label}: {(ours(ids).logits - theirs(ids).logits).abs().max().item():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per MoE forward (multiple of 8)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    cache_bytes_per_token()
    moe_speed(args.tokens, args.repeats)
    dispatch_speed(args.repeats)
    decode_speed(args.repeats)
    logit_parity()


if __name__ == "__main__":
    main()
