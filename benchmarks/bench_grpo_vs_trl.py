"""Time per GRPO step: our GRPOTrainer against TRL's GRPOTrainer on the same policy, prompts and settings.

Both trainers start from the same saved weights (our "tiny" DeepSeek-V3 preset,
random init, fp32, CPU) and train the same model class, on the same B arithmetic
prompts (the dataset holds exactly B prompts, so both see every prompt at every
step, only in a different order), with G samples each, the same reward
(rewards.math_accuracy against the `answer` column), the same loss (DeepSeekMath
GRPO: clipped token ratio, eps = 0.2, per-sequence mean, k3 KL with weight beta;
tests/grpo/test_trl_parity.py checks that the two losses agree) and the same
optimizer (torch AdamW, betas (0.9, 0.99), no weight decay, constant lr, grad
clip 1.0). One optimizer step consumes B * G completions on both sides.

    ours  GRPOTrainer with the built-in TorchRolloutEngine (a copy of the policy,
          weights synced after every step) and a RewardSuite running
          math_accuracy in-process; micro_batch_size completions per backward,
          packed without padding, each prompt once for all its completions
          (padding_free and share_prompts, the defaults; TRL pads and repeats
          the prompt for every completion, as --no-shared-prompts does);
          importance_correction="none" (TRL applies no sampler correction without
          vLLM); the reference log-probs in one no-grad forward over the step's
          B * G completions (logprob_micro_batch_size; TRL runs its reference
          forward per training micro-batch and has no such knob); with
          --num-speculative-tokens k > 0 the engine decodes with MTP
          self-speculation (exact samples of the same policy; the random-init
          MTP module is a poor draft).
    TRL   trl.GRPOTrainer, transformers `generate` (use_vllm=False), loss_type
          "grpo", use_bias_correction_kl=False (TRL's default multiplies the KL by
          the importance ratio; ours does not); per_device_train_batch_size =
          micro_batch_size, gradient_accumulation_steps = B * G / micro_batch_size,
          so steps_per_generation = gradient_accumulation_steps and one generation
          batch (B * G completions) feeds exactly one optimizer step; temperature
          1, top_p 1, top_k 0 (off), no min_p, no repetition penalty, no min
          length; bf16 and activation checkpointing off (TRL turns both on by
          default; we use neither); optim "adamw_torch", lr_scheduler "constant".
          With beta > 0 TRL loads its reference model from the saved checkpoint
          with transformers' own DeepseekV3ForCausalLM (same weights; its logits
          agree with ours to ~1e-6 and its forward runs at about the same speed).

Both stop a completion at EOS or after max_new_tokens; a random-init policy
rarely emits EOS, so most completions run to the cap on both sides (the mean
completion lengths are printed). Timings: the wall time of each optimizer step
(ours: `GRPOTrainer.training_step`, i.e. prompts -> rollouts -> rewards ->
update -> weight sync; TRL: `on_step_begin` to `on_step_end`, i.e. generation,
rewards, reference log-probs, the accumulated backward passes and the optimizer
step), and, inside it, generation alone (ours: the engine's `generate`; TRL:
`_generate`, transformers `generate` plus decoding). The first `--warmup` steps
of each trainer are not timed. The two trainers run one after the other in this
process, ours first, with the same torch thread count; with `--rounds R` both
run R times, in alternating order (ours first, then TRL first, ...), each time
from the same start, and the timed steps of all rounds are pooled, so that a
host whose speed drifts during the run weighs on both alike.

    python -m benchmarks.bench_grpo_vs_trl [--steps 10] [--warmup 2] [--rounds 1] [--prompts 16] [--samples 8]
                                           [--max-new-tokens 48] [--micro-batch-size 32] [--beta 0.04]
                                           [--logprob-micro-batch-size 0]
                                           [--num-speculative-tokens 0] [--start "random init" | sft]
                                           [--no-shared-prompts]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
import transformers
import trl
from accelerate import Accelerator
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer as TRLTrainer

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.trainer import GRPOTrainer
from r1kit.policy import load_policy
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING
from r1kit.recipes.arguments import parse_arguments
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.pipeline import load_task, load_tokenizer, warm_start
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rewards import RewardSuite, RewardSuiteConfig, math_accuracy
from r1kit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine


@dataclass
class Timings:
    """Per optimizer step: wall time, generation time (seconds) and mean completion length (tokens)."""

    step_s: list[float] = field(default_factory=list)
    generation_s: list[float] = field(default_factory=list)
    completion_length: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)  # ours: the step's time/* metrics

    def measured(self, warmup: int) -> Timings:
        """The steps after the first `warmup`."""
        return Timings(self.step_s[warmup:], self.generation_s[warmup:], self.completion_length[warmup:],
                       self.phases[warmup:])  # fmt: skip

    def __add__(self, other: Timings) -> Timings:
        """The steps of both runs."""
        return Timings(self.step_s + other.step_s, self.generation_s + other.generation_s,
                       self.completion_length + other.completion_length, self.phases + other.phases)  # fmt: skip


class TimedEngine:
    """A RolloutEngine that records how long each `generate` call takes and how long its completions are."""

    def __init__(self, engine: RolloutEngine, timings: Timings) -> None:
        self.engine, self.timings = engine, timings

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        start = time.perf_counter()
        batch = self.engine.generate(prompts, params)
        self._record(start, batch)
        return batch

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Future[RolloutBatch]:
        start = time.perf_counter()
        future = self.engine.generate_async(prompts, params)
        future.add_done_callback(lambda done: self._record(start, done.result()))
        return future

    def _record(self, start: float, batch: RolloutBatch) -> None:
        self.timings.generation_s.append(time.perf_counter() - start)
        self.timings.completion_length.append(statistics.fmean(len(ids) for ids in batch.completion_ids))

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        self.engine.update_weights(named_tensors, version)

    def close(self) -> None:
        self.engine.close()


class TimedTRLTrainer(TRLTrainer):
    """TRL's GRPOTrainer, recording the time and completion lengths of each generation batch."""

    def __init__(self, *args, timings: Timings, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timings = timings

    def _generate(self, prompts: list):
        start = time.perf_counter()
        outputs = super()._generate(prompts)
        self.timings.generation_s.append(time.perf_counter() - start)
        completion_ids = outputs[1]
        self.timings.completion_length.append(statistics.fmean(len(ids) for ids in completion_ids))
        return outputs


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from `on_step_begin` to `on_step_end`."""

    def __init__(self, timings: Timings) -> None:
        self.timings, self._start = timings, 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.timings.step_s.append(time.perf_counter() - self._start)


def run_ours(start: Path, tokenizer, prompts, args: argparse.Namespace, output_dir: Path) -> Timings:
    """Our trainer for warmup + steps steps; step times from its metrics, generation from the engine."""
    config = GRPOConfig(
        num_generations=args.samples, prompts_per_step=args.prompts, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, beta=args.beta, epsilon=0.2, objective="grpo", aggregation="sequence_mean",
        importance_correction="none", learning_rate=args.lr, adam_beta2=0.99, max_grad_norm=1.0,
        micro_batch_size=args.micro_batch_size, max_steps=args.warmup + args.steps, seed=0,
        log_completions_steps=0, output_dir=str(output_dir), share_prompts=not args.no_shared_prompts,
        logprob_micro_batch_size=args.logprob_micro_batch_size or args.prompts * args.samples,
    )  # fmt: skip
    timings = Timings()
    torch.manual_seed(0)
    policy = load_policy(start)
    engine = TorchRolloutEngine(copy.deepcopy(policy), tokenizer, num_speculative_tokens=args.num_speculative_tokens)
    engine = TimedEngine(engine, timings)
    with RewardSuite(["math_accuracy"], config=RewardSuiteConfig(num_workers=0)) as rewards:
        GRPOTrainer(config, policy, tokenizer, engine, rewards, prompts).train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    timings.step_s = [record["time/step_s"] for record in records]
    timings.phases = [{key: value for key, value in record.items() if key.startswith("time/")} for record in records]
    acceptance = [record[key] for record in records if (key := "speculation/acceptance_rate") in record]
    if acceptance:
        print(f"  ours: speculative decoding accepted {statistics.fmean(acceptance):.3f} of the drafts")
    return timings


def run_trl(start: Path, tokenizer, prompts, args: argparse.Namespace, output_dir: Path) -> Timings:
    """TRL's trainer for warmup + steps optimizer steps, each consuming prompts * samples completions."""
    completions = args.prompts * args.samples
    if completions % args.micro_batch_size:
        raise SystemExit(f"--micro-batch-size ({args.micro_batch_size}) must divide prompts * samples ({completions})")
    config = TRLConfig(
        output_dir=str(output_dir), max_steps=args.warmup + args.steps, seed=0, use_cpu=True, use_vllm=False,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=completions // args.micro_batch_size,
        num_generations=args.samples, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        loss_type="grpo", beta=args.beta, epsilon=0.2, use_bias_correction_kl=False, scale_rewards="group",
        learning_rate=args.lr, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        bf16=False, **{ACTIVATION_CHECKPOINTING: False},
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_completions=False,
    )  # fmt: skip
    timings = Timings()
    torch.manual_seed(0)
    trainer = TimedTRLTrainer(
        model=load_policy(start), reward_funcs=[math_accuracy], args=config, train_dataset=prompts,
        processing_class=tokenizer, callbacks=[StepTimer(timings)], timings=timings,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    trainer.train()
    return timings


def starting_point(args: argparse.Namespace, directory: Path) -> tuple[Path, PreTrainedTokenizerBase, Dataset]:
    """(checkpoint both trainers start from, its tokenizer, the B prompt rows with their answers).

    "random init": the embedded default's tiny policy, untrained, saved to `directory`;
    "sft": the grpo_math recipe's SFT warm start of it (cached under --cache-dir, trained first if absent).
    """
    if args.start == "sft":
        recipe, config = parse_arguments("grpo_math", ["--cache_dir", args.cache_dir])
        rows, _ = load_task(recipe)
        start = Path(warm_start(recipe, config, rows, Accelerator()))
        tokenizer = load_tokenizer(str(start))
    else:
        rows = arithmetic_dataset(2000, seed=0)
        tokenizer, start = task_tokenizer(rows), directory
        torch.manual_seed(0)
        embedded_policy(tokenizer).save_pretrained(start)
        tokenizer.save_pretrained(start)
    return start, tokenizer, rows.select(range(args.prompts)).remove_columns("completion")


def summary_line(name: str, timings: Timings) -> str:
    step, generation = timings.step_s, timings.generation_s
    rest = [s - g for s, g in zip(step, generation, strict=True)]
    return (
        f"  {name:>4}: step median {statistics.median(step):6.2f} s  mean {statistics.fmean(step):6.2f} s | "
        f"generation median {statistics.median(generation):5.2f} s | rest (rewards, log-probs, backward, "
        f"optimizer, sync) median {statistics.median(rest):5.2f} s | mean completion "
        f"{statistics.fmean(timings.completion_length):.1f} tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of both trainers, in alternating order; their steps are pooled"
    )
    parser.add_argument("--prompts", type=int, default=16, help="B: prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="completions per forward/backward")
    parser.add_argument(
        "--logprob-micro-batch-size", type=int, default=0, help="ours: rows per no-grad forward (0: B * G, one forward)"
    )
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0 adds a reference forward)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--num-speculative-tokens", type=int, default=0, help="ours: MTP drafts per decoding round")
    parser.add_argument(
        "--no-shared-prompts", action="store_true", help="ours: every completion packed with its own prompt copy"
    )
    parser.add_argument(
        "--start",
        choices=("random init", "sft"),
        default="random init",
        help="both trainers start from the untrained policy or from the recipe's SFT warm start",
    )
    parser.add_argument("--cache-dir", default="outputs/cache", help="--start sft: the recipe's SFT cache")  # fmt: skip
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1 and --warmup >= 0")

    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True  # TRL reports usage when a trainer is built
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        start, tokenizer, prompts = starting_point(args, root / "start")
        parameters = sum(p.numel() for p in load_policy(start).parameters())
        print(
            f"tiny DeepSeek-V3 ({parameters / 1e6:.2f}M parameters, {args.start}, fp32), "
            f"B={args.prompts} prompts x G={args.samples}, up to {args.max_new_tokens} new tokens, "
            f"micro-batch {args.micro_batch_size}, beta={args.beta}, lr={args.lr}, {args.warmup} warm-up + "
            f"{args.steps} timed steps, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}"
        )
        ours, theirs, trainers = Timings(), Timings(), {"ours": run_ours, "TRL": run_trl}
        for round_index in range(args.rounds):  # the order alternates, so that a host slowing down or speeding
            order = ("ours", "TRL") if round_index % 2 == 0 else ("TRL", "ours")  # up weighs on both alike
            runs = {name: trainers[name](start, tokenizer, prompts, args, root / f"{name}-{round_index}")
                    .measured(args.warmup) for name in order}  # fmt: skip
            ours, theirs = ours + runs["ours"], theirs + runs["TRL"]
            if args.rounds > 1:
                mine, trl_step = (statistics.median(runs[name].step_s) for name in ("ours", "TRL"))
                print(f"  round {round_index + 1} ({order[0]} first): step median ours {mine:.2f} s, "
                      f"TRL {trl_step:.2f} s: {trl_step / mine:.2f}x")  # fmt: skip
    print("  per-step times (s): ours " + " ".join(f"{t:.2f}" for t in ours.step_s)
          + " | TRL " + " ".join(f"{t:.2f}" for t in theirs.step_s))  # fmt: skip
    print(summary_line("ours", ours))
    medians = {phase: statistics.median(step[f"time/{phase}_s"] for step in ours.phases)
               for phase in ("rewards", "reference", "forward_backward", "optimizer", "sync")}  # fmt: skip
    print("  ours, medians of the rest: " + ", ".join(f"{phase} {median:.3f} s" for phase, median in medians.items()))
    print(summary_line("TRL", theirs))
    print(
        f"  TRL / ours: {statistics.median(theirs.step_s) / statistics.median(ours.step_s):.2f}x per step (median), "
        f"{statistics.fmean(theirs.step_s) / statistics.fmean(ours.step_s):.2f}x (mean); generation "
        f"{statistics.median(theirs.generation_s) / statistics.median(ours.generation_s):.2f}x (median)"
    )


if __name__ == "__main__":
    main()
