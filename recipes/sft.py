"""SFT alone: fine-tune on a dataset's worked solutions, then measure held-out accuracy.

    r1kit sft                                                  # the embedded default, from scratch
    r1kit sft --model PATH_OR_HUB_ID --dataset gsm8k --output_dir runs/sft
    accelerate launch -m r1kit.recipes.sft --model ... --num_processes 2

The model goes to OUTPUT_DIR/final with its config.yaml, results.json and model
card; held-out accuracy samples with the GRPO options temperature, top_p and
max_completion_length. The SFT options are the sft_* flags. Defaults:
recipes/configs/sft.yaml; `--help` lists every option.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict
from pathlib import Path

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.evaluation import EvalResult
from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments, parse_arguments, resolved_run_name


def run_sft_recipe(args: RecipeArguments, config: GRPOConfig) -> EvalResult | None:
    """SFT of `args.model` (or the embedded default) into OUTPUT_DIR/final, then its held-out accuracy.

    Returns the accuracy on the main process, None on the others.
    """
    from accelerate import PartialState

    from r1kit.recipes import pipeline  # heavy imports after --help
    from r1kit.recipes.publish import finish_run, push_final
    from r1kit.recipes.run_record import write_run_config

    args = pipeline.check_inputs(args)
    args = dataclasses.replace(args, run_name=resolved_run_name(args, config))
    state = PartialState()
    pipeline.use_cpu_threads(args, state.device)
    if state.is_main_process:
        write_run_config(config.output_dir, "sft", args, config)
    train, held_out = pipeline.load_task(args)
    tokenizer, policy = pipeline.sft_start(args, train)
    final = Path(config.output_dir) / "final"
    pipeline.train_sft(args, config, policy, tokenizer, train, final, from_scratch=args.model is None)
    if not state.is_main_process:
        return None
    result = pipeline.evaluate_checkpoint(args, config, str(final), held_out)
    finish_run(config.output_dir, "sft", args, config, {"sft": asdict(result)}, final)
    print(f"\nHeld-out accuracy ({result.num_prompts} problems x {result.samples_per_prompt} samples, "
          f"temperature {config.temperature}): {result.accuracy:.1%}")  # fmt: skip
    print(f"Model: {final}  (with its config.yaml and model card, README.md)")
    if args.push_to_hub:
        print(f"Pushed to {push_final(final, args)}")
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        args, config = parse_arguments("sft", argv)
        if args.sft == "never":
            raise ConfigError("the sft recipe trains: --sft must be always (or auto)")
        run_sft_recipe(args, config)
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
