"""Padding waste of SFT packing: our best-fit rows (sft/packing.py) against TRL's "bfd" packing, on GSM8K.

Data: GSM8K's train split in the R1 format the recipes train on
(`recipes.tasks.gsm8k.load_gsm8k`), each sample tokenized as TRL tokenizes
prompt-completion text: prompt + completion + EOS. Tokenizer: SmolLM2's (a
directory with its tokenizer.json, `--tokenizer`, default /tmp/smolout when it
exists), else the embedded default's byte-level BPE trained on the same rows.

For every row length L (`--max-length`), on the same token lengths:

    ours        `best_fit_decreasing` over the whole dataset; every row exactly
                L tokens, the end of a row padded (the layout run_sft trains on)
    TRL bfd     `trl.data_utils.pack_dataset(..., strategy="bfd")` as SFTTrainer
                calls it (best fit within each 1,000-sample map batch), rows of
                at most L tokens; then SFTTrainer's collator, which with bfd is
                padding-free: a batch of rows becomes ONE row of their summed
                length (no padding, a different length every batch). Also shown:
                the same rows padded to L (a fixed shape, as ours) and TRL's
                padded collator (padding_free=False: rows padded to the batch's
                longest).
    unpacked    one sample per row, batches padded to their longest sample
                (TRL's default collator without packing), for scale.

Padding fraction = padding tokens / all tokens of the rows. Samples longer than
L are cut to L tokens on every side. "bound" is ceil(tokens / L), the fewest
rows any packer could use. Batches: `--batch-size` rows (samples
when unpacked), in a seeded random order as Trainer's sampler draws them.

    python benchmarks/bench_sft_packing.py [--max-length 512 1024 2048 4096] [--batch-size 8]
                                           [--tokenizer DIR] [--data DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from r1kit.recipes.embedded import task_tokenizer
from r1kit.recipes.tasks.gsm8k import load_gsm8k
from r1kit.sft.packing import pack_rows

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path("/tmp/smolout")


@dataclass
class Packed:
    """One packer's result at one row length."""

    rows: int
    padding: float  # of rows padded to L (fixed shape)
    seconds: float


def find_data(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [ROOT / "shared/data/gsm8k", ROOT.parent / "shared/data/gsm8k"]
    for candidate in candidates:
        if (candidate / "train.jsonl").exists():
            return candidate
    raise SystemExit(f"train.jsonl not found in {[str(c) for c in candidates]}; pass --data")


def load_tokenizer(explicit: str | None, rows: Dataset) -> tuple[PreTrainedTokenizerBase, str]:
    path = Path(explicit) if explicit else SMOLLM2
    if (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return tokenizer, f"{path} (vocabulary {len(tokenizer)})"
    if explicit:
        raise SystemExit(f"{path} has no tokenizer.json")
    tokenizer = task_tokenizer(rows)
    return tokenizer, f"the embedded default's BPE trained on these rows (vocabulary {len(tokenizer)})"


def tokenize(rows: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of prompt + completion + EOS per row, as TRL's SFTTrainer tokenizes prompt-completion text."""
    texts = [p + c + tokenizer.eos_token for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def ours(token_ids: list[list[int]], row_length: int) -> Packed:
    start = time.perf_counter()
    columns = pack_rows(token_ids, token_ids, row_length, pad_token_id=0)
    seconds = time.perf_counter() - start
    rows, fill = len(columns["input_ids"]), sum(map(sum, columns["seq_lengths"]))
    return Packed(rows, 1 - fill / (rows * row_length), seconds)


def trl_bfd(token_ids: list[list[int]], row_length: int) -> tuple[Packed, list[dict]]:
    dataset = Dataset.from_dict({"input_ids": token_ids, "labels": token_ids})
    start = time.perf_counter()
    packed = pack_dataset(dataset, row_length, strategy="bfd")
    rows = packed.to_list()  # materialised, as the dataloader reads them
    seconds = time.perf_counter() - start
    fill = sum(len(row["input_ids"]) for row in rows)
    return Packed(len(rows), 1 - fill / (len(rows) * row_length), seconds), rows


def batches(items: Sequence, batch_size: int, seed: int) -> list[list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [[items[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def collated_padding(rows: list[dict], batch_size: int, padding_free: bool, seed: int) -> tuple[float, list[int]]:
    """(padding fraction, tokens per batch) of TRL's DataCollatorForLanguageModeling over shuffled batches."""
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    padding = total = 0
    per_batch = []
    for batch in batches(rows, batch_size, seed):
        input_ids = collator(batch)["input_ids"]
        real = sum(len(row["input_ids"]) for row in batch)
        padding, total = padding + input_ids.numel() - real, total + input_ids.numel()
        per_batch.append(input_ids.numel())
    return padding / total, per_batch


def unpacked_padding(lengths: list[int], row_length: int, batch_size: int, seed: int) -> float:
    cut = [min(n, row_length) for n in lengths]
    groups = batches(cut, batch_size, seed)
    return 1 - sum(cut) / sum(len(group) * max(group) for group in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (samples when unpacked)")
    parser.add_argument("--tokenizer", help=f"a directory with tokenizer.json (default {SMOLLM2} if there)")
    parser.add_argument("--data", help="the GSM8K directory with train.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    datasets.disable_progress_bars()

    rows = load_gsm8k(str(find_data(args.data)), "train")
    tokenizer, described = load_tokenizer(args.tokenizer, rows)
    token_ids = tokenize(rows, tokenizer)
    lengths = [len(ids) for ids in token_ids]
    print(f"GSM8K train, R1 format: {len(lengths)} samples; tokenizer: {described}; {os.cpu_count()} CPU cores")
    print(
        f"tokens per sample: min {min(lengths)}, median {statistics.median(lengths):.0f}, "
        f"max {max(lengths)}, total {sum(lengths):,}"
    )
    print(
        f"{'L':>5} {'cut':>4} {'bound':>5} | {'rows':>5} {'pad':>6} {'time':>6} | {'rows':>5} {'pad@L':>6} "
        f"{'free':>5} {'padded':>6} {'time':>6} | {'unpacked':>8} | {'rows TRL/ours':>13}"
    )
    print(f"{'':>16} | {'ours (rows of L)':<20} | {'TRL bfd (rows <= L), collated':<33} | {'':>8} |")
    for row_length in args.max_length:
        mine = ours(token_ids, row_length)
        theirs, trl_rows = trl_bfd(token_ids, row_length)
        free, per_batch = collated_padding(trl_rows, args.batch_size, padding_free=True, seed=args.seed)
        padded, _ = collated_padding(trl_rows, args.batch_size, padding_free=False, seed=args.seed)
        assert sum(per_batch) == sum(min(n, row_length) for n in lengths)
        cut = sum(n > row_length for n in lengths)
        bound = math.ceil(sum(min(n, row_length) for n in lengths) / row_length)  # no packer needs fewer rows
        print(
            f"{row_length:>5} {cut:>4} {bound:>5} | {mine.rows:>5} {mine.padding:>6.2%} {mine.seconds:>5.2f}s | "
            f"{theirs.rows:>5} {theirs.padding:>6.2%} {free:>5.1%} {padded:>6.2%} {theirs.seconds:>5.2f}s | "
            f"{unpacked_padding(lengths, row_length, args.batch_size, args.seed):>8.2%} | "
            f"{theirs.rows / mine.rows:>13.4f}"
        )
        print(
            f"{'':>16}   TRL padding-free batches: {min(per_batch)}..{max(per_batch)} tokens "
            f"(ours: always {args.batch_size} x {row_length} = {args.batch_size * row_length})"
        )


if __name__ == "__main__":
    main()
