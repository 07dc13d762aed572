"""Fixtures of the recipe tests: the flags of a run that takes seconds, and a tiny local transformers model."""

from __future__ import annotations

import pytest

# the embedded default at its smallest: a few SFT and GRPO steps, a handful of held-out problems
SMALL_RUN = [
    "--embedded_preset", "tiny-debug", "--num_train_problems", "200", "--num_eval_problems", "6",
    "--sft_max_steps", "4", "--sft_batch_size", "8", "--max_steps", "2", "--prompts_per_step", "3",
    "--num_generations", "2", "--max_completion_length", "12", "--eval_samples_per_prompt", "1",
    "--reward_workers", "0",
]  # fmt: skip


@pytest.fixture
def small_run() -> list[str]:
    return list(SMALL_RUN)


@pytest.fixture
def local_llama(tmp_path, arithmetic_tokenizer):
    """A one-layer Llama with the arithmetic tokenizer, saved as a local checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = arithmetic_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    directory = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
