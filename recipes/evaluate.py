"""Held-out accuracy of a checkpoint, with the same problems and sampling settings the recipes use.

    r1kit eval --model outputs/grpo_math/final                  # the embedded default's held-out problems
    r1kit eval --model PATH_OR_HUB_ID --dataset gsm8k --num_eval_problems 500 --eval_samples_per_prompt 8

Prints the accuracy and writes OUTPUT_DIR/eval.json. Sampling follows the
GRPO options temperature, top_p and max_completion_length; the score is the
reward named by --accuracy_reward. Defaults: recipes/configs/eval.yaml.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.evaluation import EvalResult
from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments, parse_arguments

RESULT_FILE = "eval.json"


def run_evaluation(args: RecipeArguments, config: GRPOConfig) -> EvalResult:
    """Sample and score `args.model` on the held-out split of `args.dataset`; writes OUTPUT_DIR/eval.json."""
    from r1kit.recipes import pipeline  # heavy imports after --help

    if args.model is None:
        raise ConfigError("eval needs --model: a checkpoint directory or a hub id")
    args = pipeline.check_inputs(args)
    pipeline.use_cpu_threads(args, pipeline.default_device())
    _, held_out = pipeline.load_task(args)
    result = pipeline.evaluate_checkpoint(args, config, args.model, held_out)
    output = Path(config.output_dir) / RESULT_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "dataset": args.dataset, "accuracy_reward": args.accuracy_reward,
              "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
              "min_p": config.min_p, **asdict(result)}  # fmt: skip
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.model}: held-out accuracy {result.accuracy:.1%} ({result.num_prompts} problems x "
          f"{result.samples_per_prompt} samples, temperature {config.temperature}) -> {output}")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        run_evaluation(*parse_arguments("eval", argv))
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
