"""The DeepSeek-R1 pipeline in stages: cold-start SFT, GRPO, rejection sampling, SFT on the kept samples, GRPO.

    accelerate launch recipes/r1_pipeline.py                       # recipes/configs/r1_tiny.yaml
    accelerate launch recipes/r1_pipeline.py --config recipes/configs/r1.yaml --model PATH_OR_HUB_ID
    accelerate launch recipes/r1_pipeline.py --output_dir runs/r1 --cpu_threads 2

`--config` names the recipe (a YAML file with shared settings and a `stages`
list, see recipes/stages.py); any other `--key value` overrides a shared
setting. A rerun skips the stages that finished with the same settings. The
held-out accuracy after every stage is printed in one table at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from r1kit.grpo.options import ConfigError

DEFAULT_RECIPE = Path(__file__).parent / "configs" / "r1_tiny.yaml"


def parse_command_line(argv: list[str]) -> tuple[Path, dict]:
    """(recipe path, shared-setting overrides) from `--config FILE --key value ...`."""
    if len(argv) % 2:
        raise ConfigError(f"expected --key value pairs, got {argv}")
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    if not all(key.startswith("--") for key in pairs):
        raise ConfigError(f"expected --key value pairs, got {argv}")
    overrides = {key[2:]: yaml.safe_load(value) for key, value in pairs.items()}
    return Path(overrides.pop("config", DEFAULT_RECIPE)), overrides


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("the multi-stage pipeline runs in one process; launch it without --num_processes")
        recipe, overrides = parse_command_line(argv)
        from r1kit.recipes.stages import load_recipe, run_stages  # heavy imports after --help

        run_stages(load_recipe(recipe, overrides))
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
