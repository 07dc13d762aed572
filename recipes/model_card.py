"""The model card of a finished run (`final/README.md`): what was trained, on what, how, and how well.

The card is Markdown with the Hugging Face Hub's YAML metadata block on top,
written from the run's resolved options (recipe.run_record.resolved_options),
its held-out results and its software versions, so it holds nothing the run
did not record.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from r1kit.recipes.run_record import CONFIG_FILE, software_line

HUB_DATASETS = {"gsm8k": "openai/gsm8k"}
ALGORITHM_OPTIONS = (
    ("G (completions per prompt)", "num_generations"),
    ("prompts per step", "prompts_per_step"),
    ("steps", "max_steps"),
    ("learning rate", "learning_rate"),
    ("learning-rate schedule", "lr_schedule"),
    ("KL weight beta (k3 estimator)", "beta"),
    ("clip epsilon (low / high)", "epsilon"),
    ("updates per batch (mu)", "num_iterations"),
    ("advantage estimator", "advantage_estimator"),
    ("loss aggregation", "aggregation"),
    ("objective", "objective"),
    ("sampling temperature / top-p / top-k / min-p", "temperature"),
    ("max completion length", "max_completion_length"),
    ("training dtype", "dtype"),
    ("LoRA rank (0: full fine-tuning)", "lora_r"),
    ("seed", "seed"),
)

SFT_OPTIONS = (
    ("optimizer steps", "sft_max_steps"),
    ("sequences per step", "sft_batch_size"),
    ("learning rate (default: 2e-3 from scratch, 1e-5 otherwise)", "sft_learning_rate"),
    ("learning-rate schedule", "sft_lr_schedule"),
    ("training dtype", "dtype"),
    ("seed", "seed"),
)


def is_hub_id(model: str | None) -> bool:
    """Whether `model` names a hub repository ("org/name") rather than a local directory."""
    return model is not None and model.count("/") == 1 and not model.startswith((".", "/", "~")) \
        and not Path(model).exists()  # fmt: skip


def base_model_line(options: dict) -> str:
    if options["model"] is None:
        return f"the embedded tiny DeepSeek-V3 (`{options['embedded_preset']}` preset), trained from scratch"
    return f"[{options['model']}](https://huggingface.co/{options['model']})" if is_hub_id(options["model"]) \
        else f"`{options['model']}` (a local checkpoint)"  # fmt: skip


def data_line(options: dict) -> str:
    dataset = options["dataset"]
    if dataset == "arithmetic":
        return (f"{options['num_train_problems']:,} generated arithmetic word problems (up to "
                f"{options['task_max_steps']} operations; {options['task_slip_rate']:.0%} of the SFT solutions "
                "carry an arithmetic slip)")  # fmt: skip
    if dataset in HUB_DATASETS:
        return f"[{HUB_DATASETS[dataset]}](https://huggingface.co/datasets/{HUB_DATASETS[dataset]})"
    return f"`{dataset}` (local files)"


def _value(options: dict, key: str) -> str:
    if key == "epsilon":
        high = options["epsilon_high"] if options["epsilon_high"] is not None else options["epsilon"]
        return f"{options['epsilon']} / {high}"
    if key == "temperature":
        return " / ".join(str(options.get(name, off)) for name, off in
                          (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0)))  # fmt: skip
    return str(options[key])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def results_section(results: dict | None, options: dict) -> list[str]:
    if not results:
        return ["No held-out evaluation was recorded for this run."]
    first = next(iter(results.values()))
    lines = [
        f"Held-out accuracy of `{options['accuracy_reward']}` on {first['num_prompts']} problems, "
        f"{_count(first['samples_per_prompt'], 'sample')} each at temperature {options['temperature']}:",
        "",
        "| checkpoint | accuracy | mean completion length (tokens) |",
        "|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | {result['accuracy']:.1%} | {result['mean_completion_length']:.1f} |")
    return lines


def model_card(recipe: str, options: dict, results: dict | None, environment: dict,
               command: str, plot: str | None = None) -> str:  # fmt: skip
    """The card's Markdown. results: {checkpoint name: EvalResult as a dict}; plot: an image file beside it."""
    metadata = {"library_name": "transformers", "tags": ["r1kit", "grpo", "reasoning", recipe]}
    if is_hub_id(options["model"]):
        metadata["base_model"] = options["model"]
    if options["dataset"] in HUB_DATASETS:
        metadata["datasets"] = [HUB_DATASETS[options["dataset"]]]
    weights = options["reward_weights"] or [1.0] * len(options["reward"])
    rewards = ", ".join(f"`{name}` x {weight}" for name, weight in zip(options["reward"], weights, strict=True))
    runs_sft = options["sft"] == "always" or (options["sft"] == "auto" and options["model"] is None)
    sft = "a supervised warm start, then " if runs_sft else ""
    method = ("supervised fine-tuning on worked solutions" if recipe == "sft"
              else f"{sft}GRPO (group-relative policy optimization) against rule-based rewards")  # fmt: skip
    settings = SFT_OPTIONS if recipe == "sft" else ALGORITHM_OPTIONS
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {options['run_name']}",
        "",
        f"Trained with r1kit's `{recipe}` recipe: {method}.",
        "",
        f"- **Base model:** {base_model_line(options)}",
        f"- **Data:** {data_line(options)}",
        f"- **Rewards:** {rewards} (built-in rules under a {options['reward_timeout_s']} s limit per completion, "
        f"other functions {options['reward_batch_timeout_s']} s per batch)",
        "",
        "## Results",
        "",
        *results_section(results, options),
        "",
        "## Algorithm and settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {label} | {_value(options, key)} |" for label, key in settings),
        "",
        f"Every option of the run is in [`{CONFIG_FILE}`]({CONFIG_FILE}).",
    ]
    if plot is not None:
        lines += ["", "## Training report", "", f"![training report]({plot})"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Software: {software_line(environment)}; r1kit commit {environment.get('git_commit') or 'unknown'}.",
        "",
    ]
    return "\n".join(lines)
