"""Fixtures of the SFT tests: a ChatML tokenizer, tiny Llamas and SFTConfigs that run in seconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import AddedToken
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from trl import SFTConfig

from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerBase:
    """The arithmetic BPE tokenizer with ChatML's <|im_start|> / <|im_end|> tokens and chat template."""
    from r1kit.recipes.embedded import task_tokenizer
    from r1kit.recipes.tasks.arithmetic import arithmetic_dataset

    tokenizer = task_tokenizer(arithmetic_dataset(300, seed=0))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer.chat_template = CHATML
    return tokenizer


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


@pytest.fixture
def sft_config(tmp_path) -> Callable[..., SFTConfig]:
    """sft_config(steps=6, **overrides): CPU, batches of 8, 128 tokens, no checkpoints, no reports."""

    def build(steps: int = 6, **overrides) -> SFTConfig:
        fields = dict(
            output_dir=str(tmp_path / "run"),
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            max_length=128,
            disable_tqdm=True,
        )
        return SFTConfig(**{**fields, ACTIVATION_CHECKPOINTING: False, **overrides})

    return build
