"""Fixtures for the rollout tests: a tiny DeepSeek-V3 checkpoint with a word-level tokenizer, and log-prob helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from r1kit.policy import DeepseekV3ForCausalLM, preset_config

PAD, EOS = 0, 1


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word "t{i}" (0 = <pad>, 1 = <eos>); decoding joins words with spaces."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the worker processes take the other core, and 2-thread small ops crawl when it is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny-debug DeepSeek-V3 (fp32, random weights, MTP on) plus its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-debug")
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(preset_config("tiny-debug")).save_pretrained(directory)
    word_tokenizer(preset_config("tiny-debug").vocab_size).save_pretrained(directory)
    return directory


def sequence_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float, kept=None
) -> torch.Tensor:
    """log p(completion[t] | prompt, completion[:t]) under `model`, from one full forward: (T,) float32.

    kept: the completion's kept sets (a TokenSets); the distribution is then renormalised over them.
    """
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logits = logits / (temperature if temperature > 0 else 1.0)
    if kept is not None:
        logits = logits.masked_fill(~kept.to_mask(logits.shape[-1]), float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def max_logprob_error(model: torch.nn.Module, batch, temperature: float) -> float:
    """Largest |sampler log-prob - full-forward log-prob| over every token of a RolloutBatch
    (renormalised over the sampler's kept sets when the batch recorded them)."""
    kept = batch.kept_tokens or [None] * len(batch)
    errors = [
        (sequence_logprobs(model, prompt, completion, temperature, sets) - sampled).abs().max().item()
        for prompt, completion, sampled, sets in zip(
            batch.prompt_ids, batch.completion_ids, batch.sampler_logprobs, kept, strict=True
        )
        if completion
    ]
    return max(errors)
