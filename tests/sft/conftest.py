"""Fixtures of the SFT tests: tiny Llamas (the ChatML tokenizer and SFTConfigs are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@pytest.fixture
def tiny_llama() -> Callable[..., LlamaForCausalLM]:
    """tiny_llama(tokenizer, attention="sdpa"): a one-layer fp32 Llama sized to `tokenizer`, random init."""

    def build(tokenizer: PreTrainedTokenizerBase, attention: str = "sdpa") -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation=attention,
        )
        return LlamaForCausalLM(config)

    return build
