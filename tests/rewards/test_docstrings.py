"""The `>>>` examples in the rewards package's docstrings are true."""

import doctest
import importlib
import pkgutil

import pytest

from r1kit import rewards

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(rewards.__path__, "r1kit.rewards.")
    if info.name not in ("r1kit.rewards.worker_main", "r1kit.rewards.rules.sandbox_harness")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_examples_in_the_rewards_guide():
    from pathlib import Path

    guide = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"
    text = "\n".join(line for line in guide.read_text().splitlines() if not line.startswith("```"))
    globs = {name: getattr(rewards, name) for name in rewards.__all__}
    test = doctest.DocTestParser().get_doctest(text, globs, "docs/rewards.md", str(guide), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert test.examples and runner.failures == 0
