"""The recipes' command line: RecipeArguments + GRPOConfig from YAML defaults, a --config file and flags.

Precedence, lowest first: the dataclass defaults, the recipe's own YAML
(recipes/configs/<recipe>.yaml), a `--config FILE` given by the user, then
command-line flags. `--help` lists every option with its documentation. TRL's
option names work too, with TRL's meaning (recipes/trl_options.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from trl import TrlParser

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.options import ConfigError, option
from r1kit.policy.modeling import MLA_DECODE_PATHS
from r1kit.recipes.hub import check_repo_id
from r1kit.recipes.prompts import CHAT_TEMPLATE_MODES
from r1kit.recipes.trl_options import TRLOptions, apply_trl_options, trl_only_options

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_HELP = (
    "YAML file of option values, keyed by these flags' names (a run's OUTPUT_DIR/config.yaml holds all of them); "
    "flags given beside it override it."
)


@dataclass
class RecipeArguments:
    """What to train and on what; the GRPO hyper-parameters are in GRPOConfig."""

    model: str | None = option(None, "Policy: hub id or local path. Default: the embedded tiny DeepSeek-V3.")
    embedded_preset: str = option("tiny", "Size of the embedded default policy (a name in policy.PRESETS).")
    dataset: str = option(
        "arithmetic",
        "arithmetic (generated) | gsm8k (hub, or GSM8K's train/test.jsonl in a directory) | a .jsonl/.json/.parquet/"
        ".csv file or a directory of them | a hub id; rows in TRL's formats (prompt, prompt + completion, messages)",
    )
    dataset_config: str | None = option(None, "The hub dataset's configuration (subset) name.")
    dataset_train_split: str = option("train", "Split to train on.")
    dataset_test_split: str = option(
        "test", "Split held-out problems come from; without one they are taken out of the training split."
    )
    rename_columns: list[str] = option([], "old=new pairs renaming the dataset's columns, e.g. question=prompt.")
    use_chat_template: str = option(
        "auto",
        "Plain-text prompts: auto (as one user message in the chat template when the tokenizer has one) | always "
        "| never. Conversational prompts always use the template.",
    )
    system_prompt: str | None = option(None, "System prompt added to every prompt: text, or r1 for DeepSeek-R1's.")
    num_train_problems: int = option(20000, "Training problems to generate (arithmetic only).")
    num_eval_problems: int = option(200, "Held-out problems evaluated before and after GRPO.")
    task_max_start: int = option(20, "Arithmetic: largest starting quantity.")
    task_max_operand: int = option(10, "Arithmetic: largest added or subtracted quantity.")
    task_max_factor: int = option(3, "Arithmetic: largest multiplier.")
    task_max_steps: int = option(2, "Arithmetic: most operations per problem.")
    task_slip_rate: float = option(0.0, "Arithmetic: share of training solutions with an arithmetic slip.")
    reward: list[str] = option(["math_accuracy", "format"], "Reward functions: registered names or 'module:function'.")
    reward_weights: list[float] | None = option(None, "One weight per reward (default 1 each).")
    reward_timeout_s: float = option(
        10.0, "Time limit of a built-in rule reward on one completion, in seconds (the worker is killed past it)."
    )
    reward_batch_timeout_s: float = option(
        300.0, "Time limit of one whole-batch call of any other reward (yours, TRL's), in seconds."
    )
    reward_workers: int = option(2, "Reward worker processes (0 scores in the training process).")
    accuracy_reward: str = option("math_accuracy", "Reward reported as accuracy and used for evaluation.")
    sft: str = option("auto", "SFT warm start: auto (embedded default only, cached) | always | never.")
    sft_max_steps: int = option(600, "SFT optimizer steps.")
    sft_learning_rate: float | None = option(None, "SFT learning rate (default 2e-3 from scratch, 1e-5 otherwise).")
    sft_batch_size: int = option(32, "SFT sequences per optimizer step.")
    sft_lr_schedule: str = option(
        "cosine",
        "SFT learning rate after warm-up: cosine | constant | multi_step (DeepSeek LLM's, with --lr_milestones).",
    )
    sft_max_length: int = option(
        1024, "SFT sequence length in tokens: longer samples are cut (with a warning); the packed row length."
    )
    sft_packing: bool = option(
        False, "Pack SFT samples best-fit into rows of sft_max_length tokens, no attention across samples."
    )
    sft_logging_steps: int | None = option(None, "Log SFT metrics every N steps (default: about 20 times a run).")
    cache_dir: str = option("outputs/cache", "Where the embedded default's SFT warm start is cached.")
    eval_samples_per_prompt: int = option(4, "Completions sampled per held-out problem (accuracy = their mean).")
    rollout: str = option(
        "worker",
        "Where completions are sampled: worker (built-in engine in worker processes) | local (in the trainer) "
        "| vllm (vLLM workers on their own GPUs) | vllm-colocated (vLLM on the trainer's GPU, asleep while it trains)",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3,
        "--rollout vllm-colocated: the share of the GPU's memory vLLM takes for its weights and KV cache, beside "
        "the policy being trained (TRL's name and default).",
    )
    rollout_workers: int = option(1, "Worker processes to launch (worker and vllm).")
    rollout_connect: list[str] = option(
        [], "host:port of workers started by hand with `r1kit serve-rollout` (python -m r1kit.rollout.serve)."
    )
    rollout_threads: int | None = option(None, "CPU threads of each torch worker (default: as --cpu_threads).")
    mla_decode: str = option(
        "absorbed",
        "Built-in engine, DeepSeek-V3 policies: absorbed (fast MLA decoding) | expanded (the training forward's "
        "arithmetic: in bf16/FP8 the sampler's log-probs are about 10x closer to the trainer's).",
    )
    num_speculative_tokens: int = option(
        0,
        "Built-in engine, DeepSeek-V3 policies with MTP modules: tokens the first MTP module drafts per decoding "
        "round, verified in one forward; samples stay exactly the policy's (docs/rollout.md). 0: off.",
    )
    cpu_threads: int | None = option(
        None,
        "torch threads of each training process on CPU (default: this machine's cores divided among its training "
        "processes; `accelerate launch` without a config would leave one).",
    )
    dtype: str = option("float32", "Training dtype: float32 | bfloat16.")
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in GRPO's backward instead of storing them (less memory)."
    )
    fp8: bool = option(
        False, "Train the policy's projections and experts in FP8 with block scaling (docs/fp8.md; emulated on CPU)."
    )
    fsdp: bool = option(
        False,
        "Shard the DeepSeek-V3 policy and its KL reference with FSDP2 over the launched processes (torchrun or "
        "accelerate launch): each builds on the meta device and loads only its own slices (docs/parallelism.md).",
    )
    expert_parallel: int = option(
        1, "With --fsdp: split each MoE layer's routed experts over this many processes (divides both counts)."
    )
    lora_r: int = option(0, "LoRA rank for GRPO (0: train all weights). The KL reference is the adapter-free base.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = option(
        None, "Modules that get adapters (default: MLA projections for DeepSeek-V3, all linear layers otherwise)."
    )
    resume: bool = option(
        False, "Resume from the newest checkpoint in output_dir (sft-then-grpo: skip an SFT stage that finished)."
    )
    report_to: list[str] = option(
        [], "Experiment trackers for SFT and GRPO: tensorboard, wandb, trackio, mlflow, ... (any accelerate supports)."
    )
    tracker_project: str = option("r1kit", "The trackers' project, which groups runs.")
    run_name: str | None = option(None, "This run's name in the trackers and the model card (default: output_dir's).")
    push_to_hub: bool = option(False, "Push final/ (model, config, model card, report) to the Hugging Face Hub.")
    hub_model_id: str | None = option(None, "Hub repository for --push_to_hub: 'name' or 'owner/name'.")
    hub_private_repo: bool = option(False, "Create the hub repository as private.")

    def __post_init__(self) -> None:
        if self.use_chat_template not in CHAT_TEMPLATE_MODES:
            raise ConfigError(f"--use_chat_template must be auto, always or never, got {self.use_chat_template!r}")
        if self.sft not in ("auto", "always", "never"):
            raise ConfigError(f"--sft must be auto, always or never, got {self.sft!r}")
        if self.sft_lr_schedule not in ("cosine", "constant", "multi_step"):
            raise ConfigError(f"--sft_lr_schedule must be cosine, constant or multi_step, got {self.sft_lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards")
        if self.mla_decode not in MLA_DECODE_PATHS:
            raise ConfigError(f"--mla_decode must be one of {', '.join(MLA_DECODE_PATHS)}, got {self.mla_decode!r}")
        if self.rollout not in ("worker", "local", "vllm", "vllm-colocated"):
            raise ConfigError(f"--rollout must be worker, local, vllm or vllm-colocated, got {self.rollout!r}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(
                f"--vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}"
            )
        if self.num_speculative_tokens < 0:
            raise ConfigError(f"--num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.rollout_workers < 1:
            raise ConfigError(f"--rollout_workers must be >= 1, got {self.rollout_workers}")
        for name in ("cpu_threads", "rollout_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sft_max_length < 1 or (self.sft_logging_steps is not None and self.sft_logging_steps < 1):
            raise ConfigError("--sft_max_length and --sft_logging_steps must be >= 1")
        if self.lora_r < 0:
            raise ConfigError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.num_eval_problems < 1 or self.eval_samples_per_prompt < 1:
            raise ConfigError("num_eval_problems and eval_samples_per_prompt must be >= 1")
        if self.push_to_hub and self.hub_model_id is None:
            raise ConfigError("--push_to_hub needs --hub_model_id ('name' or 'owner/name')")
        if self.hub_model_id is not None:
            try:
                check_repo_id(self.hub_model_id)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    @property
    def runs_sft(self) -> bool:
        """Whether the recipe fine-tunes before GRPO: --sft always, or auto for the embedded default."""
        return self.sft == "always" or (self.sft == "auto" and self.model is None)


def parse_arguments(recipe: str, argv: list[str] | None = None) -> tuple[RecipeArguments, GRPOConfig]:
    """Parse the recipe's YAML defaults, an optional --config file and the flags in `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = (RecipeArguments, GRPOConfig, TRLOptions)
    parser = TrlParser(kinds, allow_abbrev=False)  # --num_generation is not --num_generations
    # read by TrlParser before the dataclasses are parsed; declared here so that --help lists it
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    options = sorted({field.name for kind in kinds for field in dataclasses.fields(kind)})
    recipe_defaults = CONFIG_DIR / f"{recipe}.yaml"
    if recipe_defaults.exists():
        defaults = yaml.safe_load(recipe_defaults.read_text())
        check_option_names(defaults, options, str(recipe_defaults))
        parser.set_defaults_with_config(**defaults)
    flags = [arg.removeprefix("--").split("=")[0] for arg in argv if arg.startswith("--")]
    given = {f.replace("-", "_") for f in flags if f not in ("help", "config")}
    check_option_names(sorted(given), options, where=None, prefix="--")
    if "--config" in argv:
        path = Path(argv[argv.index("--config") + 1])
        if not path.exists():
            raise FileNotFoundError(f"--config {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        check_option_names(values, [*options, "env"], f"--config {path}")
        given |= set(values)
    recipe_args, grpo_config, trl_options, *_ = parser.parse_args_and_config(argv)  # then --config's namespace
    recipe_args, grpo_config = apply_trl_options(trl_options, recipe_args, grpo_config, recipe, given)
    recipe_args.run_name = resolved_run_name(recipe_args, grpo_config)
    return recipe_args, grpo_config


def check_option_names(names, options: list[str], where: str | None, prefix: str = "") -> None:
    """Raise a ConfigError for the first of `names` that is not an option, suggesting the closest one.

    where: the file the names come from (None for the command line); prefix: "--" for flags.
    """
    unsupported = sorted(set(names) & trl_only_options() - set(options))
    if unsupported:
        where = f"{where}: " if where else ""
        raise ConfigError(f"{where}TRL option(s) r1kit does not support: {', '.join(prefix + n for n in unsupported)}"
                          " (remove them; docs/trl.md lists what maps onto what)")  # fmt: skip
    for name in names:
        if name.replace("-", "_") not in options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f" (`{prefix}help` lists every option)"
            raise ConfigError(f"{where + ': ' if where else ''}unknown option {prefix}{name}{hint}")


def resolved_run_name(args: RecipeArguments, config: GRPOConfig) -> str:
    """--run_name, or by default the name of the output directory."""
    return args.run_name or Path(config.output_dir).resolve().name
