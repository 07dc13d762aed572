"""Tiny local models for the model-based reward tests: no hub, built from configs in milliseconds.

- `word_tokenizer(words)`: a word-level fast tokenizer built with the `tokenizers` library.
- `tiny_reward_model(...)`: a 2-layer LlamaForSequenceClassification with one label.
- `constant_token_lm(...)`: a tiny causal LM whose greedy output is always token id 0
  (its final norm is zeroed, so every logit is 0 and argmax picks the first id).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from r1kit.rewards.models import RewardModelReward

SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]
WORDS = [
    "the",
    "answer",
    "is",
    "38",
    "39",
    "19",
    "12",
    "7",
    "2",
    "think",
    "verdict",
    ":",
    "correct",
    "incorrect",
    "question",
    "reference",
    "response",
]


def word_tokenizer(words: Sequence[str] = WORDS, *, first: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `first` words get the lowest ids, then the specials, then `words`."""
    vocab: dict[str, int] = {}
    for word in [*first, *SPECIALS, *words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _config(vocab_size: int, **extra: object) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )


def tiny_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = _config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def save_tiny_reward_model(directory: Path) -> Path:
    """Write a tiny reward model and its tokenizer to `directory` (loadable with from_pretrained)."""
    tokenizer = word_tokenizer()
    tiny_reward_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reward_model_from_directory(directory: str) -> RewardModelReward:
    """Factory for IsolatedReward: loads the saved tiny reward model in the worker process."""
    return RewardModelReward(directory, batch_size=2, use_chat_template=False)


def constant_token_lm(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = _config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model
