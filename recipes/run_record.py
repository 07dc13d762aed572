"""What a run leaves behind so it can be shared and reproduced: its resolved options and the software it ran on.

`config.yaml` holds every option of the run, resolved (defaults, recipe YAML,
`--config` file and flags merged), so `r1kit grpo --config OUTPUT_DIR/config.yaml`
runs it again. Its header comments name the recipe, the date, and the
versions of r1kit, torch, transformers and Python, with the git commit when
r1kit runs from a checkout; `environment()` returns the same as a dict for
results.json and the model card.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from r1kit.grpo.config import GRPOConfig
from r1kit.recipes.arguments import RecipeArguments

CONFIG_FILE = "config.yaml"
VERSIONED_PACKAGES = ("r1kit", "torch", "transformers", "accelerate", "trl", "peft")
RECIPE_COMMANDS = {"grpo_math": "grpo", "sft_then_grpo": "sft-then-grpo", "sft": "sft"}  # recipe -> `r1kit` command


def rerun_command(recipe: str, config_path: str = CONFIG_FILE) -> str:
    """The shell command that runs `recipe` again from its saved options."""
    return f"r1kit {RECIPE_COMMANDS.get(recipe, recipe)} --config {config_path}"


def resolved_options(args: RecipeArguments, config: GRPOConfig) -> dict:
    """Every option of the run by its flag name, as `--config` accepts them back."""
    return {**asdict(args), **config.to_dict()}


def git_commit(source_root: Path) -> str | None:
    """The commit of the git checkout whose top level is `source_root` ("-dirty" when files differ from it).

    None when `source_root` is not the top of a checkout: an installed r1kit inside
    some other repository (a venv in a project's folder) must not report that one's commit.
    """
    try:
        run = lambda *command: subprocess.run(["git", *command], cwd=source_root, capture_output=True, text=True,
                                              timeout=10, check=True).stdout.strip()  # fmt: skip
        if Path(run("rev-parse", "--show-toplevel")).resolve() != source_root.resolve():
            return None
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, str | None]:
    """Versions of the packages that shape a run, Python's, and r1kit's git commit (None when not a checkout)."""
    versions: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    versions["python"] = platform.python_version()
    versions["git_commit"] = git_commit(Path(__file__).resolve().parents[1])  # recipes/ sits at the top
    return versions


def software_line(env: dict[str, str | None]) -> str:
    """The versions in `environment()` as one line, "r1kit 0.1.0, torch 2.13.0, ...", without the commit."""
    return ", ".join(f"{name} {value}" for name, value in env.items() if name != "git_commit" and value)


def write_run_config(directory: str | Path, recipe: str, args: RecipeArguments, config: GRPOConfig) -> Path:
    """Write `directory/config.yaml`: the run's resolved options under a header naming recipe and versions."""
    path = Path(directory) / CONFIG_FILE
    env = environment()
    header = [
        f"# r1kit {recipe} run, started {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"# software: {software_line(env)}",
        f"# r1kit git commit: {env['git_commit'] or 'none (not run from a git checkout)'}",
        f"# run again: {rerun_command(recipe, str(path))}",
    ]
    body = yaml.safe_dump(resolved_options(args, config), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + body)
    return path
