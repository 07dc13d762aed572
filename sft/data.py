"""Checks on SFT data before training starts: TRL's dataset types, and samples cut at max_length.

TRL's SFTTrainer takes these row formats (and tokenizes them; sft/trainer.py):

    prompt-completion    prompt, completion   both strings, or both lists of chat messages
                                              (conversational); loss on the completion only
    conversational LM    messages             a list of chat messages; loss on every token
                                              (or the assistant turns with assistant_only_loss)
    language modelling   text                 a string (`dataset_text_field`); loss on every token

A chat message is {"role": str, "content": str}; conversational rows are
rendered with the tokenizer's chat template. When a dataset has several of
these columns, the first format in the table wins, as in TRL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from r1kit.grpo.options import ConfigError

logger = logging.getLogger(__name__)

MESSAGES = "a non-empty list of chat messages ({'role': str, 'content': str})"


@dataclass(frozen=True)
class SFTFormat:
    """Which of TRL's SFT dataset types a dataset holds."""

    columns: tuple[str, ...]  # ("prompt", "completion"), ("messages",) or (the text column,)
    conversational: bool  # values are chat messages, rendered with the tokenizer's chat template


def sft_columns(column_names: Sequence[str], text_column: str = "text") -> tuple[str, ...]:
    """The columns that hold the SFT data, by TRL's precedence; a ConfigError naming the columns there are."""
    if "prompt" in column_names or "completion" in column_names:
        missing = [c for c in ("prompt", "completion") if c not in column_names]
        if missing:
            raise ConfigError(f"SFT dataset is missing column(s) {missing}; it has {list(column_names)}")
        return ("prompt", "completion")
    for column in ("messages", text_column):
        if column in column_names:
            return (column,)
    raise ConfigError(
        f"SFT dataset has columns {list(column_names)}; expected TRL's prompt + completion, messages, "
        f"or {text_column!r} (language modelling)"
    )


def is_conversation(value: Any) -> bool:
    """Whether `value` is a non-empty list of {"role": str, "content": str} messages."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def check_sft_dataset(dataset: Dataset, text_column: str = "text") -> SFTFormat:
    """The TRL SFT format of `dataset`, or a one-line ConfigError naming the first bad row and column.

    Prompt-completion data is conversational when the first row's prompt is a
    list; every value of both columns must then be messages, otherwise a
    non-empty string. `messages` rows are always conversational, text rows never.
    """
    columns = sft_columns(dataset.column_names, text_column)
    if len(dataset) == 0:
        raise ConfigError("SFT dataset is empty")
    first = dataset[0][columns[0]]
    conversational = columns == ("messages",) or (columns[0] == "prompt" and isinstance(first, list))
    for column in columns:
        for index, value in enumerate(dataset[column]):
            valid = is_conversation(value) if conversational else isinstance(value, str) and value != ""
            if not valid:
                expected = MESSAGES if conversational else "a non-empty string"
                raise ConfigError(
                    f"SFT dataset row {index}: column {column!r} must be {expected}, got {repr(value)[:120]}"
                )
    return SFTFormat(columns, conversational)


def warn_cut_samples(lengths: Sequence[int], max_length: int, dropped: int, dataset_name: str = "train") -> None:
    """Log one warning if any sample is longer than `max_length` tokens, saying how many are.

    lengths: tokens per sample before the cut. dropped: cut samples left with no
    token in the loss (a prompt alone filling max_length), which were removed.
    """
    cut = sum(length > max_length for length in lengths)
    if cut:
        lost = f"; {dropped} of them lost every loss token and were dropped" if dropped else ""
        logger.warning(
            f"SFT {dataset_name} data: {cut} of {len(lengths)} samples are longer than max_length={max_length} "
            f"tokens and were cut to their first {max_length}{lost} (raise max_length to keep them whole)"
        )
