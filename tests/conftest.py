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
    from recipes.embedded import train_bpe_tokenizer
    from recipes.tasks.arithmetic import arithmetic_dataset

    rows = arithmetic_dataset(300, seed=0)
    return train_bpe_tokenizer(p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True))


@pytest.fixture
def debug_policy(arithmetic_tokenizer):
    """Our DeepSeek-V3 at the "tiny-debug" size, vocabulary of the arithmetic tokenizer, fp32, random init."""
    from policy import DeepseekV3ForCausalLM, preset_config

    tok = arithmetic_tokenizer
    config = preset_config(
        "tiny-debug", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    return DeepseekV3ForCausalLM(config).eval()
