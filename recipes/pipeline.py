"""SFT then GRPO, end to end: the steps both recipes share.

data  -> tokenizer + policy -> SFT warm start (cached for the embedded default)
      -> held-out accuracy of the SFT checkpoint -> GRPO -> held-out accuracy of the GRPO
         checkpoint, with the same problems and sampling settings
      -> the run's record: config.yaml, results.json, report.png, final/ with a model card
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTConfig

from r1kit.grpo.adapters import DEEPSEEK_V3_LORA_TARGETS
from r1kit.grpo.checkpoint import MODEL_DIR, list_checkpoints
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.data import checkpoint_stop_token_ids
from r1kit.grpo.evaluation import EvalResult, evaluate
from r1kit.grpo.options import ConfigError
from r1kit.grpo.trainer import GRPOTrainer
from r1kit.policy import PRESETS, DeepseekV3ForCausalLM, load_policy
from r1kit.policy.moe import has_moe_layers
from r1kit.policy.parallelize import build_mesh, parallelize
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING, enable_activation_checkpointing
from r1kit.recipes.arguments import RecipeArguments, resolved_run_name
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.fetch_model import gguf_checkpoint
from r1kit.recipes.prompts import format_prompts
from r1kit.recipes.publish import finish_run, push_final
from r1kit.recipes.run_record import resolved_options, write_run_config
from r1kit.recipes.tasks.arithmetic import ArithmeticTaskConfig, arithmetic_splits
from r1kit.recipes.tasks.gsm8k import load_gsm8k
from r1kit.recipes.tasks.trl_formats import load_trl_dataset
from r1kit.recipes.tracking import grpo_trackers, sft_run_name, sft_tracker_environment, start_trackers
from r1kit.rewards import RewardSuite, RewardSuiteConfig, resolve
from r1kit.rewards.suite import suite_name
from r1kit.rollout.engine import RolloutEngine, SamplingParams
from r1kit.rollout.messages import AUTHKEY_ENV
from r1kit.rollout.remote import RemoteRolloutEngine
from r1kit.rollout.serve import WorkerOptions
from r1kit.rollout.torch_engine import TorchRolloutEngine
from r1kit.sft.rejection_sampling import write_json
from r1kit.sft.trainer import run_sft

SFT_MARKER = "r1kit_sft.json"  # written into the SFT checkpoint once it is saved


@dataclass(frozen=True)
class PipelineResult:
    sft: EvalResult
    grpo: EvalResult
    final_model: str


def check_sampler_options(args: RecipeArguments, config: GRPOConfig) -> None:
    """keep_routing, keep_sampling_mask and MTP speculation need the built-in engine."""
    if args.rollout.startswith("vllm") and args.num_speculative_tokens > 0:
        raise ConfigError("--num_speculative_tokens drafts with the built-in engine (--rollout worker or local)")
    if args.rollout.startswith("vllm") and (config.keep_routing or config.keep_sampling_mask):
        option = "keep_routing" if config.keep_routing else "keep_sampling_mask"
        raise ConfigError(
            f"--{option} needs the built-in engine (--rollout worker or local): vLLM returns neither the experts "
            f"it routes to nor its top-k/top-p kept sets; pass --{option} false to sample with vLLM"
        )


def check_speculation(args: RecipeArguments, policy: torch.nn.Module) -> None:
    """MTP speculative decoding drafts with the policy's MTP modules."""
    if args.num_speculative_tokens > 0 and len(getattr(policy, "mtp", ())) == 0:
        raise ConfigError(
            f"--num_speculative_tokens drafts with the policy's MTP modules; {type(policy).__name__} has none "
            f"(pass --num_speculative_tokens 0)"
        )


def check_sharding(args: RecipeArguments, num_processes: int) -> None:
    """--fsdp and --expert_parallel: what they combine with (each combination here is tested)."""
    if args.expert_parallel != 1 and not args.fsdp:
        raise ConfigError("--expert_parallel shards the experts under FSDP2: add --fsdp")
    if not args.fsdp:
        return
    if args.expert_parallel < 1 or num_processes % args.expert_parallel:
        raise ConfigError(f"--expert_parallel {args.expert_parallel} must divide the {num_processes} processes")
    for flag, used in (("--lora_r", args.lora_r > 0), ("--fp8", args.fp8),
                       ("--gradient_checkpointing", args.gradient_checkpointing)):  # fmt: skip
        if used:
            raise ConfigError(f"{flag} is not supported with --fsdp yet; train without one of them")


def routing_replay(config: GRPOConfig, policy: torch.nn.Module, announce: bool) -> GRPOConfig:
    """`config` with keep_routing off for a policy without MoE layers (nothing to replay), said once."""
    if not config.keep_routing or has_moe_layers(policy):
        return config
    if announce:
        print(f"keep_routing: {type(policy).__name__} has no MoE layers, so there is no routing to replay; off")
    return dataclasses.replace(config, keep_routing=False)


def check_inputs(args: RecipeArguments) -> RecipeArguments:
    """Fail fast, naming the culprit, before any data is loaded or model built.

    Returns `args` with a GGUF `--model` file replaced by its converted checkpoint (cached in cache_dir).
    """
    if args.model is not None and args.model.endswith(".gguf"):
        args = dataclasses.replace(args, model=str(gguf_checkpoint(Path(args.model), Path(args.cache_dir))))
    looks_local = args.model is not None and (args.model.startswith((".", "/", "~")) or Path(args.model).exists())
    if looks_local and not (Path(args.model).expanduser() / "config.json").exists():
        raise ConfigError(f"--model {args.model}: no such model directory (or it has no config.json)")
    if args.model is None and args.embedded_preset not in PRESETS:
        raise ConfigError(f"--embedded_preset {args.embedded_preset}: not one of {sorted(PRESETS)}")
    for spec in args.reward:
        try:
            resolve(spec)
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            raise ConfigError(f"--reward: {error}") from error
    if args.rollout_connect and not os.environ.get(AUTHKEY_ENV):
        raise ConfigError(f"--rollout_connect: set {AUTHKEY_ENV} to the secret the workers were started with")
    if args.accuracy_reward not in args.reward:
        raise ConfigError(f"--accuracy_reward {args.accuracy_reward} is not one of --reward {args.reward}")
    return args


def load_task(args: RecipeArguments) -> tuple[Dataset, Dataset]:
    """(train, held-out) rows with a prompt column (and completion, answer, ... as the data has them), the
    prompts formatted for the model (chat template, system prompt: recipes/prompts.py)."""
    if args.dataset == "arithmetic":
        task = ArithmeticTaskConfig(
            args.task_max_start, args.task_max_operand, args.task_max_factor, args.task_max_steps, args.task_slip_rate
        )
        train, held_out = arithmetic_splits(args.num_train_problems, args.num_eval_problems, seed=0, cfg=task)
    elif args.dataset == "gsm8k":
        train, test = load_gsm8k(args.dataset, "train"), load_gsm8k(args.dataset, "test")
        train, held_out = train, test.select(range(min(args.num_eval_problems, len(test))))
    else:
        train, held_out = load_trl_dataset(
            args.dataset, config=args.dataset_config, train_split=args.dataset_train_split,
            test_split=args.dataset_test_split, renames=args.rename_columns, num_eval=args.num_eval_problems,
        )  # fmt: skip
    has_template = args.model is not None and load_tokenizer(args.model).chat_template is not None
    format_ = lambda rows: format_prompts(rows, args.use_chat_template, args.system_prompt, has_template)
    return format_(train), format_(held_out)


def sft_fingerprint(args: RecipeArguments, config: GRPOConfig) -> str:
    """A short hash of everything that shapes the SFT warm start: model, data, SFT settings and seed."""
    fields = {k: v for k, v in asdict(args).items() if k.startswith(("task_", "sft_", "num_train"))}
    if args.sft_lr_schedule == "multi_step":
        fields["lr_milestones"] = config.lr_milestones
    fields.update(model=args.model, dataset=args.dataset, dtype=args.dtype, seed=config.seed,
                  preset=args.embedded_preset if args.model is None else None)  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def warm_start(args: RecipeArguments, config: GRPOConfig, train: Dataset, accelerator: Accelerator) -> str:
    """The checkpoint GRPO starts from: an SFT run's output, a cached or finished one, or the given model.

    The embedded default's SFT is cached under `cache_dir` by its settings. Any
    other SFT writes OUTPUT_DIR/sft and, once saved, the marker SFT_MARKER with
    its settings' fingerprint; `--resume` reuses it when the settings match.
    """
    embedded = args.model is None
    if not args.runs_sft:
        if embedded:
            raise ConfigError("the embedded default is untrained: it needs --sft auto or always")
        return args.model
    fingerprint = sft_fingerprint(args, config)
    target = Path(args.cache_dir) / f"embedded-sft-{fingerprint}" if embedded else Path(config.output_dir) / "sft"
    marker = target / SFT_MARKER
    if embedded and (target / "config.json").exists():
        accelerator.print(f"SFT warm start: cached at {target}")
        return str(target)
    if args.resume and marker.exists():
        if json.loads(marker.read_text())["fingerprint"] != fingerprint:
            raise ConfigError(f"--resume: the SFT stage in {target} ran with other settings; resume with the same "
                              "model, data and SFT options, or start a new output_dir")  # fmt: skip
        accelerator.print(f"SFT warm start: finished earlier, skipped ({target})")
        return str(target)
    tokenizer, policy = sft_start(args, train)
    accelerator.print(f"SFT warm start: {args.sft_max_steps} steps -> {target}")
    train_sft(args, config, policy, tokenizer, train, target, from_scratch=embedded)
    if accelerator.is_main_process:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": fingerprint, "steps": args.sft_max_steps})
    accelerator.wait_for_everyone()
    return str(target)


def sft_start(args: RecipeArguments, train: Dataset) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    """(tokenizer, policy) SFT starts from: `args.model`, or the untrained embedded default and a task tokenizer."""
    if args.model is None:
        tokenizer = task_tokenizer(train)
        return tokenizer, embedded_policy(tokenizer, args.embedded_preset)
    return load_tokenizer(args.model), load_policy(args.model, dtype=_dtype(args))


def train_sft(args: RecipeArguments, config: GRPOConfig, policy: nn.Module, tokenizer: PreTrainedTokenizerBase,
              data: Dataset, target: str | Path, *, from_scratch: bool) -> Path:  # fmt: skip
    """SFT of `policy` on prompt/completion `data` with the recipe's SFT settings; saved to `target`."""
    sft_args = SFTConfig(
        output_dir=str(target) + ".run",
        max_steps=args.sft_max_steps,
        per_device_train_batch_size=args.sft_batch_size,
        learning_rate=args.sft_learning_rate or (2e-3 if from_scratch else 1e-5),
        lr_scheduler_type="cosine" if args.sft_lr_schedule == "cosine" else "constant_with_warmup",
        warmup_steps=min(20, args.sft_max_steps // 10),
        weight_decay=0.0,
        logging_steps=args.sft_logging_steps or max(1, min(50, args.sft_max_steps // 20)),
        save_strategy="no",
        report_to=args.report_to or "none",
        run_name=sft_run_name(resolved_run_name(args, config)),
        project=args.tracker_project,
        seed=config.seed,
        max_length=args.sft_max_length,
        packing=args.sft_packing,
        bf16=args.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        **{ACTIVATION_CHECKPOINTING: not from_scratch},  # the tiny model needs no memory savings
    )
    # multi_step: run_sft swaps constant_with_warmup for the multi-step schedule, which has the same warm-up
    lr_milestones = config.lr_milestone_pairs if args.sft_lr_schedule == "multi_step" else None
    with sft_tracker_environment(config.output_dir, args.tracker_project, resolved_run_name(args, config)):
        return run_sft(policy, tokenizer, data, sft_args, target, lr_milestones=lr_milestones)


def use_cpu_threads(args: RecipeArguments, device: torch.device) -> None:
    """Training on CPU: give torch this process's share of the cores (see `cpu_threads`) and say so."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(args.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training on CPU with {torch.get_num_threads()} torch threads per process")


def cpu_threads(requested: int | None, processes_on_machine: int) -> int:
    """torch threads for one training process on CPU: `requested`, else its share of the cores it may use.

    `accelerate launch` without a config exports OMP_NUM_THREADS=1, which would
    leave every core but one idle in a single-process run.
    """
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes_on_machine)


def _dtype(args: RecipeArguments) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bfloat16" else torch.float32


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_pipeline(args: RecipeArguments, config: GRPOConfig, recipe: str = "grpo_math") -> PipelineResult | None:
    """SFT warm start (as configured), GRPO, and held-out accuracy before and after.

    Under `accelerate launch` with several processes every process trains; the
    main process also holds the rollout engine and the reward suite, evaluates,
    writes the run's record (config.yaml first, then results, report and model
    card), pushes to the hub when asked, and returns the result (the others return None).
    """
    args = check_inputs(args)
    check_sampler_options(args, config)
    args = dataclasses.replace(args, run_name=resolved_run_name(args, config))
    accelerator = Accelerator(log_with=grpo_trackers(args.report_to, config.output_dir, args.run_name) or None,
                              project_dir=config.output_dir)  # fmt: skip
    use_cpu_threads(args, accelerator.device)
    if accelerator.is_main_process:
        write_run_config(config.output_dir, recipe, args, config)
    train, held_out = load_task(args)
    start = warm_start(args, config, train, accelerator)
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(config.output_dir) if args.resume else []
    tokenizer, dtype = load_tokenizer(start), _dtype(args)
    check_sharding(args, accelerator.num_processes)
    if args.fsdp:
        mesh = build_mesh(args.expert_parallel, accelerator.device.type)
        # a sharded run's checkpoint holds shards (model/), which the trainer's resume loads into these
        hf_weights = bool(checkpoints) and not (checkpoints[-1] / MODEL_DIR).is_dir()
        policy = sharded_policy(str(checkpoints[-1]) if hf_weights else start, mesh, dtype, accelerator.device)
        reference = sharded_policy(start, mesh, dtype, accelerator.device) if config.beta > 0 else None
    else:
        policy = _trainable_policy(args, start, checkpoints[-1] if checkpoints else None, accelerator)
        reference = load_policy(start, dtype=dtype) if config.beta > 0 else None
    config = routing_replay(config, policy, accelerator.is_main_process)
    check_speculation(args, policy)
    if args.report_to:
        start_trackers(accelerator, args.tracker_project, args.run_name, resolved_options(args, config))
    with contextlib.ExitStack() as stack:
        engine = suite = accuracy = None
        if accelerator.is_main_process:
            engine = rollout_engine(args, start, tokenizer, accelerator.device, accelerator.num_processes)
            stack.callback(engine.close)
            suite = stack.enter_context(reward_suite(args))
            accuracy = held_out_accuracy(args, config, engine, tokenizer, held_out, suite, start)
            sft_result = accuracy()
            print(f"held-out accuracy before GRPO: {sft_result.accuracy:.3f}")
        trainer = GRPOTrainer(
            config, policy, tokenizer, engine, suite, train, reference=reference,
            accelerator=accelerator, accuracy_reward=suite_name(args.accuracy_reward),
            evaluate=lambda step: accuracy().as_metrics(),
        )  # fmt: skip
        if checkpoints:
            accelerator.print(f"resumed from {checkpoints[-1]} at step {trainer.resume(checkpoints[-1])}")
        elif accelerator.is_main_process:
            trainer.logger.reset()
            trainer.logger.log(0, sft_result.as_metrics())  # the held-out accuracy GRPO starts from
        final = trainer.train()
        if accelerator.is_main_process:
            grpo_result = accuracy()
            trainer.logger.log(config.max_steps, grpo_result.as_metrics())
        accelerator.end_training()
        if not accelerator.is_main_process:
            return None
        result = PipelineResult(sft=sft_result, grpo=grpo_result, final_model=str(final))
    _report(result, args, config, recipe)
    return result


def rollout_engine(args: RecipeArguments, start: str, tokenizer: PreTrainedTokenizerBase,
                   device: torch.device, num_processes: int = 1) -> RolloutEngine:  # fmt: skip
    """The engine the main process samples with, holding the weights of `start` until the first sync.

    `device` is the training process's (for --rollout local), `num_processes` how many train.
    """
    if args.rollout == "local":
        policy = load_policy(start, dtype=_dtype(args), device=device)
        if hasattr(policy, "set_mla_decode"):
            policy.set_mla_decode(args.mla_decode)
        return TorchRolloutEngine(policy, tokenizer, num_speculative_tokens=args.num_speculative_tokens)
    if args.rollout == "vllm-colocated":
        if num_processes > 1:
            raise ConfigError("--rollout vllm-colocated runs with one training process; use --rollout vllm")
        from r1kit.rollout.vllm_engine import VLLMRolloutEngine

        share = args.vllm_gpu_memory_utilization
        if torch.cuda.is_available():  # the policy is on the GPU already: vLLM gets what it asks for, or stops
            check_colocated_memory(share, *torch.cuda.mem_get_info(device))
        return VLLMRolloutEngine(start, dtype=args.dtype, colocate=True, sleep_level=1, gpu_memory_utilization=share)
    if args.rollout_connect:
        return RemoteRolloutEngine.connect(args.rollout_connect)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.rollout_threads or (torch.get_num_threads() if device == "cpu" else None)  # as the trainer's
    options = WorkerOptions(engine="vllm" if args.rollout == "vllm" else "torch", device=device, dtype=args.dtype,
                            num_threads=threads, mla_decode=args.mla_decode,
                            num_speculative_tokens=args.num_speculative_tokens)  # fmt: skip
    return RemoteRolloutEngine.launch(start, args.rollout_workers, options=options)


def check_colocated_memory(share: float, free_bytes: int, total_bytes: int) -> None:
    """vLLM colocated with the trainer takes `share` of the device's total memory; refuse, naming the numbers,
    when that is more than is free once the policy is loaded (vLLM would fail at start-up, less clearly)."""
    if share * total_bytes <= free_bytes:
        return
    gib = 2**30
    raise ConfigError(
        f"--vllm_gpu_memory_utilization {share}: vLLM would take {share * total_bytes / gib:.1f} GiB of the GPU's "
        f"{total_bytes / gib:.1f} GiB, but only {free_bytes / gib:.1f} GiB are free beside the policy; give at most "
        f"{free_bytes / total_bytes:.2f}, less what training needs (gradients, optimizer state, activations)"
    )


def reward_suite(args: RecipeArguments) -> RewardSuite:
    """The recipe's rewards, weights, time limit and worker processes as a RewardSuite."""
    config = RewardSuiteConfig(
        timeout_s=args.reward_timeout_s, call_timeout_s=args.reward_batch_timeout_s, num_workers=args.reward_workers
    )
    return RewardSuite(args.reward, args.reward_weights, config)


def sharded_policy(source: str, mesh: DeviceMesh, dtype: torch.dtype, device: torch.device) -> DeepseekV3ForCausalLM:
    """Our DeepSeek-V3 from `source`, sharded over `mesh` with FSDP2 and expert parallelism while still on the
    meta device: each process allocates and reads only its own slices. The trainer shards the root."""
    if json.loads((Path(source) / "config.json").read_text()).get("model_type") != "deepseek_v3":
        raise ConfigError(f"--fsdp shards our DeepSeek-V3; {source} is another architecture (use DDP or accelerate's "
                          "FSDP config for it)")  # fmt: skip
    return DeepseekV3ForCausalLM.from_pretrained(
        source, dtype=dtype, device=device, shard=lambda model: parallelize(model, mesh, shard_root=False)
    )


def _trainable_policy(args: RecipeArguments, start: str, checkpoint: Path | None, accelerator: Accelerator):
    """The policy GRPO trains: full weights, or the start model under a LoRA adapter (new or resumed)."""
    fp8 = True if args.fp8 else None  # None keeps what the checkpoint's config says
    if args.lora_r == 0:
        policy = load_policy(checkpoint or start, dtype=_dtype(args), device=accelerator.device, fp8=fp8)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        return policy
    base = load_policy(start, dtype=_dtype(args), device=accelerator.device, fp8=fp8)
    if args.gradient_checkpointing:  # transformers checkpoints non-reentrantly: frozen embeddings need no hook
        enable_activation_checkpointing(base)
    if checkpoint is not None:  # LoRA checkpoints hold the adapter only
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    targets = args.lora_target_modules or (
        DEEPSEEK_V3_LORA_TARGETS if isinstance(base, DeepseekV3ForCausalLM) else "all-linear"
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(base, lora)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def sampling(args: RecipeArguments, model: str) -> Iterator[tuple[RolloutEngine, PreTrainedTokenizerBase, RewardSuite]]:
    """A rollout engine holding `model`, its tokenizer and the recipe's reward suite; both closed after."""
    tokenizer = load_tokenizer(model)
    engine = rollout_engine(args, model, tokenizer, default_device())
    try:
        with reward_suite(args) as suite:
            yield engine, tokenizer, suite
    finally:
        engine.close()


def evaluate_checkpoint(args: RecipeArguments, config: GRPOConfig, model: str, held_out: Dataset) -> EvalResult:
    """Held-out accuracy of checkpoint `model` under the recipe's rewards and sampling settings."""
    with sampling(args, model) as (engine, tokenizer, suite):
        return held_out_accuracy(args, config, engine, tokenizer, held_out, suite, model)()


def held_out_accuracy(
    args: RecipeArguments,
    config: GRPOConfig,
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset,
    suite: RewardSuite,
    checkpoint: str | None = None,
) -> Callable[[], EvalResult]:
    """A function that evaluates the engine's current weights on the held-out prompts, same settings each time.

    checkpoint: where the engine's model came from; its generation config's EOS ids also end completions.
    """
    params = SamplingParams(
        n=args.eval_samples_per_prompt, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        min_p=config.min_p, max_new_tokens=config.max_completion_length,
        stop_token_ids=checkpoint_stop_token_ids(tokenizer, checkpoint), stop_strings=tuple(config.stop_strings),
        seed=1234,
    )  # fmt: skip
    name = suite_name(args.accuracy_reward)
    accuracy = lambda p, c, columns: suite.score(p, c, columns).scores[name].tolist()
    return lambda: evaluate(engine, tokenizer, prompts, accuracy, params)


def _report(result: PipelineResult, args: RecipeArguments, config: GRPOConfig, recipe: str) -> None:
    """Write the run's record (results, report, model card in final/), print the summary, push if asked."""
    output_dir = Path(config.output_dir)
    held_out = {"sft": asdict(result.sft), "grpo": asdict(result.grpo)}
    finish_run(output_dir, recipe, args, config, held_out, final_model=result.final_model)
    n, k = result.sft.num_prompts, result.sft.samples_per_prompt
    gain = 100 * (result.grpo.accuracy - result.sft.accuracy)
    print(f"\nHeld-out accuracy ({n} problems x {k} samples, temperature {config.temperature}):")
    print(f"  {'SFT  checkpoint' if args.runs_sft else 'start model    '}: {result.sft.accuracy:6.1%}")
    print(f"  GRPO checkpoint: {result.grpo.accuracy:6.1%}  ({gain:+.1f} points)")
    print(f"Model: {result.final_model}  (with its config.yaml and model card, README.md)")
    print(f"Metrics: {output_dir}/metrics.jsonl   Plot: {output_dir}/report.png")
    if args.push_to_hub:
        print(f"Pushed to {push_final(result.final_model, args)}")
