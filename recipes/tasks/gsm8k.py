"""GSM8K as prompt / completion / answer rows, from local JSONL files or the hub.

GSM8K rows have a `question` and an `answer` holding a worked solution with
calculator annotations (`<<48/2=24>>`) and a final line `#### 72`. For GRPO the
`answer` column keeps the full solution (the math-accuracy reward reads the
number after `####`); for SFT the solution is rewritten into the R1 format:

    <think> Natalia sold 48/2 = 24 clips in May. ... </think> <answer> 72 </answer>
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, load_dataset

from r1kit.grpo.options import ConfigError
from r1kit.recipes.tasks.arithmetic import format_prompt

HUB_ID = "openai/gsm8k"
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


def split_solution(solution: str) -> tuple[str, str]:
    """(reasoning, final answer) of a GSM8K solution ending in '#### N'."""
    reasoning, sep, final = solution.rpartition("####")
    if not sep:
        raise ConfigError(f"GSM8K solution has no '#### <answer>' line: {solution[-80:]!r}")
    return CALCULATOR_ANNOTATION.sub("", reasoning).strip(), final.strip().replace(",", "")


def to_rows(dataset: Dataset) -> Dataset:
    """Map GSM8K's question/answer columns to prompt, completion (R1 format) and answer."""
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ConfigError(f"a GSM8K dataset needs columns 'question' and 'answer'; missing {sorted(missing)}")

    def convert(row: dict) -> dict:
        reasoning, final = split_solution(row["answer"])
        reasoning = " ".join(reasoning.split("\n"))
        return {
            "prompt": format_prompt(row["question"]),
            "completion": f"<think> {reasoning} </think> <answer> {final} </answer>",
            "answer": row["answer"],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def load_gsm8k(source: str, split: str) -> Dataset:
    """GSM8K `split` ("train" or "test") from a directory of `{split}.jsonl`, a .jsonl file, or the hub."""
    path = Path(source)
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.exists():
            raise FileNotFoundError(f"{path} has no {split}.jsonl (found: {sorted(p.name for p in path.iterdir())})")
        return to_rows(load_dataset("json", data_files=str(file), split="train"))
    if path.suffix == ".jsonl":
        if not path.exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        return to_rows(load_dataset("json", data_files=str(path), split="train"))
    if source not in ("gsm8k", HUB_ID):
        raise ConfigError(f"{source!r} is neither a GSM8K directory, a .jsonl file, nor 'gsm8k'")
    return to_rows(load_dataset(HUB_ID, "main", split=split))
