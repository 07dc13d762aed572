"""Prompts for GRPO: encoding, the ids that end a completion, and shuffled passes over a dataset, resumable exactly."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from datasets import Dataset
from transformers import GenerationConfig, PreTrainedTokenizerBase

from r1kit.grpo.options import ConfigError


def check_prompt_dataset(dataset: Dataset, prompt_column: str, required: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming what is missing if `dataset` cannot feed GRPO."""
    missing = [c for c in (prompt_column, *required) if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"dataset is missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ConfigError("dataset has no rows")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: plain text as is, a list of chat messages through the chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> tuple[int, ...]:
    """Ids that end a completion: the tokenizer's EOS, plus every EOS id of the model's generation config.

    Chat models end a turn with their own tokens (`<|im_end|>`, `<|eot_id|>`), which
    their generation config lists beside (or instead of) the tokenizer's EOS.
    """
    ids = [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list | tuple) else [configured]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def checkpoint_stop_token_ids(tokenizer: PreTrainedTokenizerBase, checkpoint: str | None) -> tuple[int, ...]:
    """`stop_token_ids` with the generation config saved with `checkpoint` (a directory or hub id), if it has one."""
    generation_config = None
    if checkpoint is not None:
        with contextlib.suppress(OSError):  # no generation_config.json there
            generation_config = GenerationConfig.from_pretrained(checkpoint)
    return stop_token_ids(tokenizer, generation_config)


class PromptSampler:
    """Yields batches of rows from shuffled passes (epochs) over a dataset.

    The order is a pure function of (seed, epoch), so `state_dict()` (epoch and
    position) is all a resumed run needs to continue with the same prompts.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int) -> None:
        if batch_size > len(dataset):
            raise ConfigError(f"prompts_per_step ({batch_size}) exceeds the dataset's {len(dataset)} rows")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def next_batch(self) -> list[dict[str, Any]]:
        """The next `batch_size` rows; a pass that runs out is finished from the next one."""
        indices = []
        while len(indices) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(indices), len(self._order) - self.position)
            indices += self._order[self.position : self.position + take]
            self.position += take
        return [self.dataset[i] for i in indices]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
