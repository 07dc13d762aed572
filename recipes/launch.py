"""The recipes' entry point: parse, run the pipeline, report bad input in one line."""

from __future__ import annotations

import sys

from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import parse_arguments


def run_recipe(recipe: str, argv: list[str] | None = None) -> None:
    """Run `recipe` (a YAML name in recipes/configs) with command-line `argv`."""
    try:
        args, config = parse_arguments(recipe, argv)
        from r1kit.recipes.pipeline import run_pipeline  # heavy imports after --help

        run_pipeline(args, config, recipe)
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
