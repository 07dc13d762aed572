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
