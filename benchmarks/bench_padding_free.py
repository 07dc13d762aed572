"""Padding-free GRPO micro-batches against padded ones: the log-prob passes and the training pass.

The trainer's passes over a step's completions (grpo/update.py): the reference
and old log-probs (no gradient) and the policy forward + backward, micro-batch by
micro-batch, through `TokenLogprobModel`, with the padded layout
`[left-padded prompt | right-padded completion]` (`padding_free=False`), with
each micro-batch's sequences packed into rows, no padding between them
(`padding_free=True`; grpo/packing.py), and packed with each prompt once for
all its completions in the micro-batch ("shared prompts", `share_prompts=True`;
the trainer's default, both on).

Batch: B arithmetic prompts (`recipes.tasks.arithmetic`, tokenized as the
trainer encodes them) x G completions of random tokens, whose lengths are drawn
uniformly from `--min-length`..`--max-length` (a wide spread, as RL completions
have) or all at `--max-length` (every completion at the cap, only the prompts
differ). Micro-batches of `--micro-batch-size` completions in batch order, as
the trainer takes them. Policy: our "tiny" DeepSeek-V3 preset (the embedded
default, random init, fp32, training mode: MoE balance loss on), or with
`--model PATH` a transformers causal LM saved there (fp32, training mode; e.g.
SmolLM2-135M-Instruct from `r1kit fetch-model smollm2-135m-instruct`), its
prompts through its chat template as the recipes give them (`--use_chat_template
auto`). Training pass:
forward, loss = -sum of completion log-probs + balance loss, backward, all
micro-batches; log-probs: the same forwards under no_grad. Times are the median
of `--repeats` runs after one warm-up round, the layouts' runs taking turns (load
from other processes hits them alike), on `--threads` CPU threads.

Padding-free rows are as long as `packing.row_capacity` chooses (the default:
of L..2L, L the micro-batch's longest sequence, the capacity with the fewest
token slots) or exactly L ("rows of L"). "removed" is the share of the padded
micro-batches' token slots the packed rows do not hold (1 - packed / padded,
`padding_free/padding_removed` in a run's metrics); the ratios are padded time /
this layout's time, measured in this run.

    python -m benchmarks.bench_padding_free [--prompts 16] [--samples 8] [--min-length 4] [--max-length 48]
                                            [--micro-batch-size 32] [--repeats 5] [--threads N] [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from r1kit.grpo.batch import PolicyBatch, build_policy_batch
from r1kit.grpo.data import encode_prompt
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.grpo.update import PolicyUpdate
from r1kit.policy import load_policy
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.pipeline import load_tokenizer
from r1kit.recipes.prompts import format_prompts
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rollout.engine import RolloutBatch


def grpo_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]], samples: int, lengths: list[int], seed: int
) -> PolicyBatch:
    """G completions of random tokens of the given lengths for each prompt, as the trainer lays them out."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts for _ in range(samples)]
    completions = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    rollout = RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids=completions,
        completion_text=[""] * len(completions),
        sampler_logprobs=[torch.zeros(n) for n in lengths],
        finish_reason=["length"] * len(completions),
        policy_version=0,
    )
    return build_policy_batch(rollout, tokenizer.pad_token_id)


def micro_batches(batch: PolicyBatch, size: int) -> list[PolicyBatch]:
    """The batch's micro-batches of at most `size` completions, in order, as the trainer takes them."""
    return [batch.rows(rows) for rows in PolicyUpdate.micro_batches(len(batch), size)]


def logprob_pass(model: TokenLogprobModel, parts: list[PolicyBatch]) -> None:
    with torch.no_grad():
        for part in parts:
            model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length)


def training_pass(model: TokenLogprobModel, parts: list[PolicyBatch]) -> None:
    for part in parts:
        out = model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length)
        loss = -(out.logp * part.completion_mask).sum()
        (loss if out.aux_loss is None else loss + out.aux_loss).backward()  # transformers models: no balance loss
    model.zero_grad(set_to_none=True)


def median_seconds(runs: dict[tuple[str, str], Callable[[], None]], repeats: int) -> dict[tuple[str, str], float]:
    """Median wall time of each run; one warm-up round, then the runs take turns (contention hits all alike)."""
    times: dict[tuple[str, str], list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def removed_share(model: TokenLogprobModel, parts: list[PolicyBatch]) -> float:
    """1 - token slots the forwards run over / those of the padded micro-batches."""
    with torch.no_grad():
        outs = [model(p.input_ids, p.attention_mask, p.position_ids, p.prompt_length) for p in parts]
    return 1 - sum(out.token_slots for out in outs) / sum(out.padded_token_slots for out in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="B: prompts")
    parser.add_argument("--samples", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--min-length", type=int, default=4, help="shortest completion of the wide spread")
    parser.add_argument("--max-length", type=int, default=48, help="longest completion (the length cap)")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="completions per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a transformers causal LM (local path) instead of the tiny DeepSeek-V3")
    args = parser.parse_args()
    if not 1 <= args.min_length <= args.max_length or args.repeats < 1:
        raise SystemExit("need 1 <= --min-length <= --max-length and --repeats >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = arithmetic_dataset(2000, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.model:
        tokenizer, policy = load_tokenizer(args.model), load_policy(args.model).train()
        rows = format_prompts(rows.select(range(args.prompts)), "auto", None, tokenizer.chat_template is not None)
        name = f"{type(policy).__name__} from {args.model}"
    else:
        tokenizer = task_tokenizer(rows)
        policy, name = embedded_policy(tokenizer).train(), "tiny DeepSeek-V3"
    prompts = rows["prompt"][: args.prompts]
    layouts = {
        "padded": TokenLogprobModel(policy),
        "padding-free, rows of L": TokenLogprobModel(policy, padding_free=True, capacity=max),
        "padding-free": TokenLogprobModel(policy, padding_free=True),
        "shared prompts": TokenLogprobModel(policy, padding_free=True, share_prompts=True),
    }
    completions = args.prompts * args.samples
    generator = torch.Generator().manual_seed(args.seed)
    spread = torch.randint(args.min_length, args.max_length + 1, (completions,), generator=generator).tolist()
    prompt_lengths = [len(encode_prompt(tokenizer, prompt)) for prompt in prompts]
    print(
        f"{name} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, fp32, training "
        f"mode), {args.prompts} prompts ({min(prompt_lengths)}..{max(prompt_lengths)} tokens) x {args.samples} "
        f"completions, micro-batch {args.micro_batch_size}; median of {args.repeats} runs, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"{'completions':<17} {'layout':<24} {'removed':>7} | {'log-probs (no grad)':>19} | {'forward + backward':>19}"
    )
    for name, lengths in (
        (f"{args.min_length}..{args.max_length} tokens", spread),
        (f"all {args.max_length} tokens", [args.max_length] * completions),
    ):
        parts = micro_batches(grpo_batch(tokenizer, prompts, args.samples, lengths, args.seed), args.micro_batch_size)
        runs = {}
        for layout, model in layouts.items():
            runs[layout, "logp"] = partial(logprob_pass, model, parts)
            runs[layout, "train"] = partial(training_pass, model, parts)
        times = median_seconds(runs, args.repeats)
        for index, (layout, model) in enumerate(layouts.items()):
            cells = []
            for kind in ("logp", "train"):
                ratio = times["padded", kind] / times[layout, kind]
                cells.append(f"{times[layout, kind]:>7.3f} s {ratio:>7.2f}x")
            label = "" if index else name
            print(f"{label:<17} {layout:<24} {removed_share(model, parts):>7.1%} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    main()
