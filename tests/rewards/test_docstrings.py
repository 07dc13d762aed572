"""The `>>>` examples in the rewards package's docstrings are true."""

import doctest
import importlib
import pkgutil

import pytest

import rewards

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(rewards.__path__, "rewards.")
    if info.name not in ("rewards.worker_main", "rewards.rules.sandbox_harness")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert failures == 0
