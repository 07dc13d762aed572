"""Wall time per GRPO step with overlapped (one-step off-policy) generation against sequential.

Runs the real GRPOTrainer twice from the same weights, prompts and seeds:
sequential (generate, then update) and overlapped (`--overlap`: the worker
samples batch t+1 while the trainer updates on batch t, with truncated
importance weights correcting for the one-step lag). Generation runs in one
rollout worker process (the built-in engine), as in the embedded default.
Prints the median step time of each, their ratio, and the generation/update
split that bounds it: with a free core for each process the best possible
ratio is (generate + update) / max(generate, update).

    python -m benchmarks.bench_grpo_overlap [--steps 8] [--prompts 16] [--samples 8] [--max-new-tokens 48]
                                            [--worker-threads 1] [--trainer-threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.trainer import GRPOTrainer
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rollout.remote import RemoteRolloutEngine
from r1kit.rollout.serve import WorkerOptions


def run(policy, tokenizer, prompts, checkpoint: str, overlap: bool, args, output_dir: Path) -> list[dict]:
    config = GRPOConfig(
        num_generations=args.samples, prompts_per_step=args.prompts, max_completion_length=args.max_new_tokens,
        learning_rate=1e-4, max_steps=args.steps, micro_batch_size=64, overlap=overlap, log_completions_steps=0,
        output_dir=str(output_dir),
    )  # fmt: skip
    options = WorkerOptions(dtype="float32", num_threads=args.worker_threads)
    with (
        RemoteRolloutEngine.launch(checkpoint, options=options) as engine,
        RewardSuite(["math_accuracy"], config=RewardSuiteConfig(num_workers=0)) as rewards,
    ):
        GRPOTrainer(config, copy.deepcopy(policy), tokenizer, engine, rewards, prompts).train()
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per run (the first is not timed)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument(
        "--trainer-threads", type=int, default=None,
        help="torch threads of the trainer (default: the cores the worker leaves, so overlap never oversubscribes)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.trainer_threads or max(1, (os.cpu_count() or 1) - args.worker_threads))

    torch.manual_seed(0)
    rows = arithmetic_dataset(2000, seed=0)
    tokenizer = task_tokenizer(rows)
    policy = embedded_policy(tokenizer)
    prompts = rows.remove_columns("completion")
    print(
        f"tiny DeepSeek-V3 ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters), "
        f"{args.prompts} prompts x G={args.samples}, up to {args.max_new_tokens} new tokens, {args.steps} steps, "
        f"one worker process, torch threads: trainer {torch.get_num_threads()}, worker {args.worker_threads}"
    )
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        policy.save_pretrained(root / "start")
        tokenizer.save_pretrained(root / "start")
        results = {mode: run(policy, tokenizer, prompts, str(root / "start"), mode == "overlapped", args, root / mode)
                   for mode in ("sequential", "overlapped")}  # fmt: skip
    medians = {}
    for mode, records in results.items():
        timed = records[1:]
        medians[mode] = statistics.median(r["time/step_s"] for r in timed)
        generate = statistics.median(r["time/generation_s"] for r in timed)
        lag = max(r.get("policy_lag", 0) for r in timed)
        print(f"  {mode:>10}: {medians[mode]:.2f} s/step (waiting for generation {generate:.2f} s), policy lag {lag}")
    sequential = results["sequential"][1:]
    generate = statistics.median(r["time/generation_s"] for r in sequential)
    update = statistics.median(r["time/step_s"] - r["time/generation_s"] for r in sequential)
    print(
        f"  overlapped / sequential speed-up: {medians['sequential'] / medians['overlapped']:.2f}x "
        f"(at most {(generate + update) / max(generate, update):.2f}x with a free core for each process)"
    )


if __name__ == "__main__":
    main()
