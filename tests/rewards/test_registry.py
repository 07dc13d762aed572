"""Resolving reward specs: registered names, import paths, callables, and the errors for bad specs."""

import pytest

from r1kit.rewards import math_accuracy, register, registered_names, resolve
from r1kit.rewards.registry import _REGISTRY


def test_builtin_names_are_registered():
    assert {"math_accuracy", "format", "length_penalty", "language_consistency", "code_execution"} <= set(
        registered_names()
    )
    assert resolve("math_accuracy") is math_accuracy


def test_import_path_and_callable():
    from tests.rewards.hostile_rewards import sleepy

    assert resolve("tests.rewards.hostile_rewards:sleepy") is sleepy
    assert resolve("r1kit.rewards.rules.math_accuracy:MathAccuracy.__call__") is not None
    assert resolve(sleepy) is sleepy


def test_register_decorator_and_duplicates():
    @register("test_registry_reward")
    def my_reward(completions, **kwargs):
        return [1.0] * len(completions)

    try:
        assert resolve("test_registry_reward") is my_reward
        register("test_registry_reward")(my_reward)  # same function again: fine
        with pytest.raises(ValueError, match="already registered"):
            register("test_registry_reward")(lambda completions, **kw: [])
    finally:
        del _REGISTRY["test_registry_reward"]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("no_such_reward", ValueError, "unknown reward 'no_such_reward'"),
        ("no_such_pkg.mod:fn", ValueError, "cannot import module 'no_such_pkg.mod'"),
        ("r1kit.rewards.registry:missing", ValueError, "has no attribute 'missing'"),
        ("r1kit.rewards.rules.math_equivalence:MAX_NESTING", TypeError, "names a int, which is not callable"),
        ("r1kit.rewards.registry:", ValueError, "must look like 'package.module:function'"),
        (3, TypeError, "a reward spec must be"),
    ],
)
def test_bad_specs_raise_naming_the_spec(spec, error, message):
    with pytest.raises(error, match=message):
        resolve(spec)


def test_bad_names_cannot_be_registered():
    with pytest.raises(ValueError, match="no ':'"):
        register("a:b")
    with pytest.raises(TypeError, match="not callable"):
        register("not_callable")(42)
