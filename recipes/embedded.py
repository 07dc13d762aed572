"""The embedded default: a tokenizer and a tiny DeepSeek-V3 policy built locally.

Nothing here touches a model hub. The tokenizer is a byte-level BPE trained in
well under a second on the synthetic arithmetic corpus, with digits split one
per token (a leading space stays attached to the first digit) so that the
model can learn arithmetic column by column. The R1 tags <think>, </think>,
<answer>, </answer> are single tokens that survive decoding.
"""

from __future__ import annotations

from collections.abc import Iterable

from datasets import Dataset
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from r1kit.policy import DeepseekV3ForCausalLM, preset_config

PAD, EOS = "<|pad|>", "<|eos|>"
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with pad/eos special tokens and the R1 tags."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False) for tag in REASONING_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, model_max_length=512, padding_side="left"
    )


def task_tokenizer(rows: Dataset) -> PreTrainedTokenizerFast:
    """The embedded default's tokenizer: `train_bpe_tokenizer` on each row's prompt + completion."""
    return train_bpe_tokenizer(p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True))


def embedded_policy(tokenizer: PreTrainedTokenizerFast, preset: str = "tiny") -> DeepseekV3ForCausalLM:
    """Our DeepSeek-V3 at the `preset` size, random init, sized to `tokenizer` (vocabulary, pad and eos ids)."""
    config = preset_config(
        preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return DeepseekV3ForCausalLM(config)
