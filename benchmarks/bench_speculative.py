"""Generation speed with MTP self-speculative decoding against plain decoding, on the embedded default.

The policy is the embedded default after its SFT warm start (the tiny DeepSeek-V3
with one MTP module, trained with the MTP loss; the recipe's cached checkpoint
under --cache_dir, trained here first when absent: about 3 minutes on 2 cores).
The built-in torch engine samples the GRPO workload of recipes/configs/grpo_math.yaml
(B prompts x G samples, temperature 1, up to 48 new tokens, EOS stops) with
num_speculative_tokens k = 0 (plain: one forward per token) and each k given;
settings run in turn, `--repeats` times, each time with the same seed, so every
setting samples the same distribution. A second workload decodes one prompt's G
samples (a small batch, where a forward costs about the same for 1 or k + 1 tokens).

Printed per workload and k: median generated tokens per second, its ratio to
k = 0 measured in the same run, the draft acceptance rate and tokens emitted per
verifying forward.

    python -m benchmarks.bench_speculative [--k 1 2] [--repeats 3] [--prompts 16] [--samples 8]
                                           [--max-new-tokens 48] [--cache-dir outputs/cache]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator

from r1kit.policy import load_policy
from r1kit.recipes.arguments import parse_arguments
from r1kit.recipes.pipeline import load_task, load_tokenizer, warm_start
from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine


def measure(model, tokenizer, prompts: list[list[int]], params: SamplingParams, ks: list[int], repeats: int) -> None:
    """Prints one line per k: tokens per second (median of `repeats`), ratio to k = 0, acceptance."""
    speeds: dict[int, list[float]] = {k: [] for k in ks}
    batches: dict[int, RolloutBatch] = {}
    engines = {k: TorchRolloutEngine(model, tokenizer, num_speculative_tokens=k) for k in ks}
    engines[ks[0]].generate(prompts[:1], params)  # warm-up
    for _ in range(repeats):
        for k in ks:
            start = time.perf_counter()
            batches[k] = engines[k].generate(prompts, params)
            speeds[k].append(batches[k].num_generated_tokens / (time.perf_counter() - start))
    base = statistics.median(speeds[0])
    for k in ks:
        speed, line = statistics.median(speeds[k]), ""
        counts = batches[k].draft_counts
        if counts:
            rounds, accepted = sum(c.rounds for c in counts), sum(c.accepted for c in counts)
            line = (f" | acceptance {accepted / max(1, sum(c.drafted for c in counts)):.3f}, "
                    f"{(rounds + accepted) / max(1, rounds):.2f} tokens per forward")  # fmt: skip
        mean_length = batches[k].num_generated_tokens / len(batches[k])
        print(f"  k={k}: {speed:7.0f} tokens/s  {speed / base:5.2f}x  (mean completion {mean_length:.1f}){line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2], help="speculative tokens per round to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="B: prompts of the GRPO workload")
    parser.add_argument("--samples", type=int, default=8, help="G: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--cache-dir", default="outputs/cache", help="the recipe's SFT cache")
    args = parser.parse_args()
    if any(k < 1 for k in args.k) or args.repeats < 1:
        raise SystemExit("--k values and --repeats must be >= 1")
    recipe, config = parse_arguments("grpo_math", ["--cache_dir", args.cache_dir])
    train, _ = load_task(recipe)
    start = warm_start(recipe, config, train, Accelerator())
    tokenizer, model = load_tokenizer(start), load_policy(start).eval()
    prompts = [tokenizer(text)["input_ids"] for text in train["prompt"][: args.prompts]]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=0)  # fmt: skip
    ks = [0, *sorted(set(args.k))]
    print(f"embedded default after SFT ({start}), torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"GRPO workload: {len(prompts)} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens")
    measure(model, tokenizer, prompts, params, ks, args.repeats)
    print(f"small batch: 1 prompt x {args.samples} samples")
    measure(model, tokenizer, prompts[:1], params, ks, 3 * args.repeats)


if __name__ == "__main__":
    main()
