"""The GRPO test set-up (tiny-debug policy, arithmetic prompts, digit-share reward) as a script, run on one
process or sharded with FSDP2 and expert parallelism over the processes torchrun starts:

    python tests/grpo/sharded_run.py OUTPUT_DIR [--max-steps N] [--save-steps N] [--resume CHECKPOINT]
    ACCELERATE_USE_CPU=1 torchrun --nproc-per-node 4 tests/grpo/sharded_run.py OUTPUT_DIR --ep 2

The trainer writes metrics.jsonl and final/ to OUTPUT_DIR (main process).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for the tests' reward

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.trainer import GRPOTrainer
from r1kit.policy import load_policy
from r1kit.policy.parallelize import build_mesh, parallelize
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.grpo.conftest import digit_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--ep", type=int, default=0, help="shard with FSDP2 and this expert-parallel size (0: don't)")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", help="a checkpoint of an earlier run to continue from")
    args = parser.parse_args()

    accelerator = Accelerator()  # joins the processes torchrun started (gloo)
    torch.manual_seed(0)
    tokenizer = task_tokenizer(arithmetic_dataset(300, seed=0))
    start = embedded_policy(tokenizer, "tiny-debug")  # the same weights on every process
    # a sharded run's checkpoint holds shards, which resume() loads; one process's holds Hugging Face files
    policy = load_policy(args.resume) if args.resume and not args.ep else copy.deepcopy(start)
    engine = suite = reference = None
    if accelerator.is_main_process:
        engine = TorchRolloutEngine(copy.deepcopy(policy), tokenizer)
        suite = RewardSuite([digit_share], config=RewardSuiteConfig(num_workers=0))
    if args.ep:
        mesh = build_mesh(args.ep)
        policy, reference = (parallelize(model, mesh, shard_root=False) for model in (policy, start))
    config = GRPOConfig(
        num_generations=4, prompts_per_step=4, max_completion_length=8, learning_rate=1e-2, beta=0.04,
        micro_batch_size=4, max_steps=args.max_steps, save_steps=args.save_steps, save_total_limit=None,
        output_dir=args.output_dir, seed=0,
    )  # fmt: skip
    prompts = arithmetic_dataset(64, seed=5).remove_columns("completion")
    trainer = GRPOTrainer(config, policy, tokenizer, engine, suite, prompts, reference=reference,
                          accelerator=accelerator, accuracy_reward=None)  # fmt: skip
    if args.resume:
        trainer.resume(args.resume)
    trainer.train()
    if suite is not None:
        suite.close()


if __name__ == "__main__":
    main()
