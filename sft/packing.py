"""Best-fit-decreasing packing of tokenized SFT samples into rows of exactly `row_length` tokens.

Several samples share one row without seeing each other, as DeepSeek-V3 packs
its training data (sample masking): each sample's position ids restart at 0,
and the model turns restarting positions into a block-diagonal causal mask.

Packer (`best_fit_decreasing`, lengths in tokens; grpo/packing.py, which
packs GRPO micro-batches with it too): take the samples longest first (ties in
dataset order) and put each into the open row with the least free space that
still holds it, opening a new row when none does. A sample longer than the row
is cut to its first `row_length` tokens and fills a row alone; it is never
split over two rows, where the second part's positions would restart and it
would train on a completion without its prompt (TRL's "bfd", not "bfd_split").

Rows (`pack_rows`): the samples' tokens back to back, then padding up to
`row_length`. Labels are -100 on the padding and on every sample's first token,
so no token is predicted from the previous sample's last one; the prompt's
-100 labels (completion-only loss) travel with their sample. Every sample's
loss is then exactly what it is in a row of its own.

Batches (`PackedRowCollator`): (B, row_length) input_ids, labels and
position_ids; the trailing padding gets positions 0, 1, ... of its own, so it
is a block of its own. transformers models build the block-diagonal mask
from position_ids when there is no attention_mask and no cache
(`masking_utils.find_packed_sequence_indices`; TRL's SFTTrainer calls the
model with use_cache=False); our DeepSeek-V3 policy builds it from
position_ids in any case and also takes the padding mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from r1kit.grpo.packing import best_fit_decreasing

IGNORE = -100  # label of a token outside the loss


def padding_fraction(lengths: Sequence[int], rows: Sequence[Sequence[int]], row_length: int) -> float:
    """Padding tokens / all tokens of the rows, each sample counted at min(length, row_length) tokens."""
    if not rows:
        return 0.0
    tokens = sum(min(lengths[i], row_length) for row in rows for i in row)
    return 1.0 - tokens / (len(rows) * row_length)


def pack_rows(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], row_length: int, pad_token_id: int
) -> dict[str, list[list[int]]]:
    """Columns of the packed rows: input_ids and labels (row_length each) and seq_lengths (tokens per sample).

    input_ids, labels: per sample, of equal lengths; labels -100 where a token is
    outside the loss. Samples are cut to their first `row_length` tokens.
    """
    lengths = [min(len(ids), row_length) for ids in input_ids]
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for row in best_fit_decreasing(lengths, row_length):
        row_ids, row_labels = [], []
        for sample in row:
            row_ids += input_ids[sample][:row_length]
            row_labels += [IGNORE, *labels[sample][1:row_length]]  # never predicted across the boundary
        padding = row_length - len(row_ids)
        columns["input_ids"].append(row_ids + [pad_token_id] * padding)
        columns["labels"].append(row_labels + [IGNORE] * padding)
        columns["seq_lengths"].append([lengths[sample] for sample in row])
    return columns


def pack_dataset(tokenized: Dataset, row_length: int, pad_token_id: int) -> tuple[Dataset, int]:
    """(packed rows, samples dropped): best-fit rows of a dataset with input_ids and labels columns.

    A sample whose loss tokens all lie beyond `row_length` (after its first token)
    would train on nothing once cut; it is dropped rather than packed.
    """
    input_ids, labels = tokenized["input_ids"], tokenized["labels"]
    kept = [i for i, sample in enumerate(labels) if any(label != IGNORE for label in sample[1:row_length])]
    columns = pack_rows([input_ids[i] for i in kept], [labels[i] for i in kept], row_length, pad_token_id)
    return Dataset.from_dict(columns), len(labels) - len(kept)


def packed_position_ids(seq_lengths: Sequence[int], row_length: int) -> list[int]:
    """Positions of one row: 0.. for each sample, then 0.. again for the trailing padding.

    >>> packed_position_ids([3, 2], 7)
    [0, 1, 2, 0, 1, 0, 1]
    """
    return [position for length in (*seq_lengths, row_length - sum(seq_lengths)) for position in range(length)]


@dataclass
class PackedRowCollator:
    """Stacks packed rows (input_ids, labels, seq_lengths) into (B, row_length) tensors with position_ids.

    with_attention_mask: also return attention_mask, 0 on padding. For our
    DeepSeek-V3 policy (its MoE balance loss and router loads then skip the
    padding); never for transformers models, which ignore packed position_ids
    whenever an attention_mask is given.
    """

    with_attention_mask: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        row_length = len(rows[0]["input_ids"])
        batch = {
            "input_ids": torch.tensor([row["input_ids"] for row in rows]),
            "labels": torch.tensor([row["labels"] for row in rows]),
            "position_ids": torch.tensor([packed_position_ids(row["seq_lengths"], row_length) for row in rows]),
        }
        if self.with_attention_mask:
            real = [[1] * sum(row["seq_lengths"]) + [0] * (row_length - sum(row["seq_lengths"])) for row in rows]
            batch["attention_mask"] = torch.tensor(real)
        return batch
