"""Shared pytest set-up: CPU by default, no hub telemetry, GPU and vLLM tests skip cleanly."""

import importlib.util

import huggingface_hub.constants
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # TRL's trainers report usage to the Hugging Face Hub when built; the tests never touch the hub.
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs vLLM (pip install 'r1kit[vllm]')"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def arithmetic_tokenizer():
    """The embedded default's BPE tokenizer, trained on a small arithmetic corpus (well under a second)."""
    from r1kit.recipes.embedded import task_tokenizer
    from r1kit.recipes.tasks.arithmetic import arithmetic_dataset

    return task_tokenizer(arithmetic_dataset(300, seed=0))


@pytest.fixture
def debug_policy(arithmetic_tokenizer):
    """Our DeepSeek-V3 at the "tiny-debug" size, vocabulary of the arithmetic tokenizer, fp32, random init."""
    from r1kit.recipes.embedded import embedded_policy

    return embedded_policy(arithmetic_tokenizer, "tiny-debug").eval()


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer():
    """The arithmetic BPE tokenizer with ChatML's <|im_start|> / <|im_end|> special tokens and chat template."""
    from r1kit.recipes.embedded import task_tokenizer
    from r1kit.recipes.tasks.arithmetic import arithmetic_dataset

    tokenizer = task_tokenizer(arithmetic_dataset(300, seed=0))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def chat_tokenizer():
    """`build_chat_tokenizer()`, built once."""
    return build_chat_tokenizer()


def save_chat_model(directory, architecture: str = "llama"):
    """A tiny random instruct model saved to `directory`: `build_chat_tokenizer()` with <|im_end|> as EOS and a
    generation config ending at it and at the end of text (as Qwen2's instruct models do).
    architecture: "llama" or "qwen2". Returns the tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_chat_tokenizer()
    end_of_text = tokenizer.eos_token_id
    tokenizer.eos_token = "<|im_end|>"
    end_of_turn = tokenizer.eos_token_id
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        architecture
    ]
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=end_of_turn)  # fmt: skip
    model = model_class(config)
    model.generation_config = GenerationConfig(eos_token_id=[end_of_turn, end_of_text])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(params=["llama", "qwen2"])
def chat_model(request, tmp_path):
    """A tiny Llama- or Qwen2-style instruct model with a ChatML chat template, as a local checkpoint directory."""
    directory = tmp_path / f"chat-{request.param}"
    save_chat_model(directory, request.param)
    return directory


@pytest.fixture
def sft_config(tmp_path):
    """sft_config(steps=6, **overrides): an SFTConfig on CPU, batches of 8, 128 tokens, no checkpoints, no reports."""
    from trl import SFTConfig

    from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING

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
