"""What a finished run publishes: results.json, the report, and `final/` made shareable, optionally on the hub.

OUTPUT_DIR/config.yaml      every option, resolved (written when the run starts)
OUTPUT_DIR/results.json     held-out results, final model, software versions
OUTPUT_DIR/report.png       the training report, held-out accuracies marked
OUTPUT_DIR/final/           the model and tokenizer, plus config.yaml, results.json,
                            report.png and README.md (the model card): all a
                            reader of the hub repository needs
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.options import ConfigError
from r1kit.grpo.plotting import plot_run, settings_summary
from r1kit.recipes.arguments import RecipeArguments
from r1kit.recipes.hub import HubPushError, push_directory
from r1kit.recipes.model_card import model_card
from r1kit.recipes.run_record import CONFIG_FILE, environment, rerun_command, resolved_options

REPORT_FILE = "report.png"
RESULTS_FILE = "results.json"


def report_title(args: RecipeArguments, config: GRPOConfig) -> str:
    """The report's title: run, model, data and the settings that shape the run."""
    model = args.model or f"embedded DeepSeek-V3 ({args.embedded_preset})"
    return f"{args.run_name}: {model} on {args.dataset}  |  {settings_summary(config)}"


def finish_run(output_dir: str | Path, recipe: str, args: RecipeArguments, config: GRPOConfig,
               held_out: dict[str, dict], final_model: str | Path) -> None:  # fmt: skip
    """Write results.json and report.png, then copy them, config.yaml and a model card into `final_model`.

    held_out: {"sft": ..., "grpo": ...}, each an EvalResult as a dict, in the order they were measured.
    """
    output_dir, final = Path(output_dir), Path(final_model)
    options, env = resolved_options(args, config), environment()
    results = {**held_out, "final_model": str(final), "recipe": recipe, "environment": env}
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    metrics = output_dir / "metrics.jsonl"
    plot = None
    if metrics.exists():
        steps = {"sft": 0, "grpo": config.max_steps}
        accuracies = {_label(name, args): (steps[name], result["accuracy"]) for name, result in held_out.items()}
        plot_run(metrics, output_dir / REPORT_FILE, title=report_title(args, config), held_out=accuracies)
        shutil.copy(output_dir / REPORT_FILE, final / REPORT_FILE)
        plot = REPORT_FILE
    for name in (RESULTS_FILE, CONFIG_FILE):
        shutil.copy(output_dir / name, final / name)
    command = rerun_command(recipe)
    card_results = {_label(name, args): result for name, result in held_out.items()}
    (final / "README.md").write_text(model_card(recipe, options, card_results, env, command, plot))


def _label(checkpoint: str, args: RecipeArguments) -> str:
    """How results name a checkpoint: "SFT", "GRPO", or "start" for a start model that no SFT trained."""
    if checkpoint == "sft" and not args.runs_sft:
        return "start"
    return checkpoint.upper()


def push_final(final_model: str | Path, args: RecipeArguments) -> str:
    """Push `final_model` to `args.hub_model_id`; a failure is a ConfigError naming hub and repository."""
    try:
        return push_directory(final_model, args.hub_model_id, private=args.hub_private_repo,
                              message=f"r1kit run {args.run_name}")  # fmt: skip
    except HubPushError as error:
        saved = Path(final_model).parent
        raise ConfigError(f"--push_to_hub: {error} (the run's outputs are saved in {saved})") from error
