"""Reward names: register built-in and user rewards, resolve a spec to a reward function.

A spec is a registered name ("math_accuracy", "format", ...), an import path
"package.module:attribute" (the attribute may be dotted: "pkg.mod:Class.method"),
or a callable, which is returned as it is. Errors name the spec.

    @register("my_reward")
    def my_reward(completions, **columns): ...

    resolve("my_reward") is my_reward                      # True
    resolve("my_pkg.rewards:my_reward") is my_reward       # True

Registering a name twice with different functions is an error; names are never
silently overridden.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from r1kit.rewards.protocol import RewardFn

_REGISTRY: dict[str, RewardFn] = {}
F = TypeVar("F", bound=RewardFn)


def register(name: str) -> Callable[[F], F]:
    """Decorator registering a reward function (or callable object) under `name`; returns it unchanged."""
    if not name or ":" in name:
        raise ValueError(f"a reward name must be non-empty and contain no ':', got {name!r}")

    def decorator(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"register({name!r}) got {type(fn).__name__}, which is not callable")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"reward name {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_names() -> list[str]:
    """Sorted names that `resolve` accepts without an import path."""
    return sorted(_REGISTRY)


def _import_attribute(spec: str) -> object:
    module_name, _, attribute_path = spec.partition(":")
    if not module_name or not attribute_path:
        raise ValueError(f"reward spec {spec!r}: an import path must look like 'package.module:function'")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {error}") from error
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError as error:
            raise ValueError(
                f"reward spec {spec!r}: module {module_name!r} has no attribute {attribute_path!r}"
            ) from error
    return target


def resolve(spec: str | RewardFn) -> RewardFn:
    """The reward function a spec names: a registered name, "pkg.module:function", or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward spec must be a name, an import path or a callable, got {spec!r}")
    if ":" in spec:
        target = _import_attribute(spec)
    elif spec in _REGISTRY:
        target = _REGISTRY[spec]
    else:
        raise ValueError(
            f"unknown reward {spec!r}: registered rewards are {registered_names()}; "
            "use 'package.module:function' for your own"
        )
    if not callable(target):
        raise TypeError(f"reward spec {spec!r} names a {type(target).__name__}, which is not callable")
    return target
