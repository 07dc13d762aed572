"""Shared pytest set-up: CPU by default, GPU and vLLM tests skip cleanly."""

import importlib.util

import pytest
import torch


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
