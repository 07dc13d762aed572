"""Datasets in TRL's formats, from local files or the hub, as the rows the recipes train on.

Sources (`--dataset`): a .jsonl / .json / .parquet / .csv file, a directory
of such files (split names in the file names, e.g. train.jsonl and
test.jsonl), or a hub id with `--dataset_config` and the splits
`--dataset_train_split` / `--dataset_test_split`. `--rename_columns old=new`
maps a dataset's own column names onto these.

Row formats, TRL's names (prompts and completions are strings, or lists of
{"role", "content"} messages for conversational data):

    prompt-only          prompt                    GRPO
    prompt-completion    prompt, completion        GRPO (completion unused) and SFT
    messages             messages                  both: the last assistant turn is the completion,
                                                   the turns before it the prompt
    GSM8K-style          question, answer          both (see tasks/gsm8k.py)

Every other column stays in the rows and reaches the reward functions as a
keyword argument (`answer=[...]`, `solution=[...]`), as in TRL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from r1kit.grpo.options import ConfigError
from r1kit.recipes.tasks.gsm8k import to_rows as gsm8k_rows
from r1kit.rewards.protocol import is_conversational

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_splits(source: str, config: str | None, train_split: str, test_split: str) -> tuple[Dataset, Dataset | None]:
    """(train, test or None) as stored at `source`: a data file, a directory of data files or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in FILE_TYPES:
            raise ConfigError(f"--dataset {source}: not a {' / '.join(FILE_TYPES)} file")
        return load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train"), None
    if path.is_dir():
        splits = _load(str(path), None, source)
    elif source.startswith((".", "/", "~")) or Path(source).suffix in FILE_TYPES:
        raise ConfigError(f"--dataset {source}: no such file or directory")
    else:
        splits = _load(source, config, source)
    if train_split not in splits:
        raise ConfigError(f"--dataset {source}: no split {train_split!r} (it has {sorted(splits)}); "
                          "set --dataset_train_split")  # fmt: skip
    return splits[train_split], splits.get(test_split)


def _load(path: str, config: str | None, source: str) -> DatasetDict:
    try:
        return load_dataset(path, config)
    except Exception as error:  # offline, unknown id, bad files: the datasets library's errors vary by cause
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"--dataset {source}: could not load it: {reason}") from error


def rename_columns(dataset: Dataset, renames: list[str]) -> Dataset:
    """Apply `old=new` renames, naming the columns that exist when one does not."""
    mapping = {}
    for rename in renames:
        old, sep, new = rename.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename_columns {rename!r}: expected old=new")
        if old not in dataset.column_names:
            raise ConfigError(f"--rename_columns {rename}: the dataset has no column {old!r}; "
                              f"it has {dataset.column_names}")  # fmt: skip
        mapping[old] = new
    return dataset.rename_columns(mapping) if mapping else dataset


def to_training_rows(dataset: Dataset) -> Dataset:
    """Rows with a `prompt` column (and `completion` where the data has one) from any format above."""
    columns = set(dataset.column_names)
    if len(dataset) == 0:
        raise ConfigError("the dataset has no rows")
    if "prompt" in columns:
        if "completion" in columns and is_conversational(dataset[0]["prompt"]) != is_conversational(
            dataset[0]["completion"]
        ):
            raise ConfigError("prompt and completion must both be text or both be lists of messages")
        return dataset
    if "messages" in columns:
        return dataset.map(split_conversation, remove_columns=["messages"])
    if {"question", "answer"} <= columns:
        return gsm8k_rows(dataset)
    raise ConfigError(
        f"the dataset has columns {dataset.column_names}; expected TRL's prompt (prompt-only), prompt + completion, "
        "or messages (or GSM8K's question + answer); --rename_columns old=new maps other names"
    )


def split_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A `messages` row as prompt (every turn before the last) and completion (the last, an assistant turn)."""
    messages = row["messages"]
    if not is_conversational(messages) or messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ConfigError("every 'messages' row must be a conversation ending with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def held_out_split(train: Dataset, test: Dataset | None, num_eval: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out of at most `num_eval` rows): the test split's first rows, else rows taken out of train."""
    if test is not None:
        return train, test.select(range(min(num_eval, len(test))))
    if num_eval >= len(train):
        raise ConfigError(f"the dataset has {len(train)} rows and no test split: too few to hold out "
                          f"--num_eval_problems {num_eval}")  # fmt: skip
    parts = train.train_test_split(test_size=num_eval, seed=seed)
    return parts["train"], parts["test"]


def load_trl_dataset(
    source: str,
    *,
    config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    renames: list[str] | None = None,
    num_eval: int = 200,
) -> tuple[Dataset, Dataset]:
    """(train, held-out) training rows from `source` (see the module docstring)."""
    train, test = load_splits(source, config, train_split, test_split)
    prepare = lambda split: to_training_rows(rename_columns(split, renames or []))
    return held_out_split(prepare(train), prepare(test) if test is not None else None, num_eval)
