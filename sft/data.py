"""Checks on SFT data before training starts."""

from __future__ import annotations

from datasets import Dataset

from r1kit.grpo.options import ConfigError


def check_sft_dataset(dataset: Dataset, prompt_column: str = "prompt", completion_column: str = "completion") -> None:
    """Raise a ValueError naming the problem if `dataset` is not usable prompt/completion SFT data."""
    missing = [c for c in (prompt_column, completion_column) if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"SFT dataset is missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ConfigError("SFT dataset is empty")
    for column in (prompt_column, completion_column):
        for index, value in enumerate(dataset[column]):
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"SFT dataset row {index}: column {column!r} must be a non-empty string, got {value!r}"
                )
