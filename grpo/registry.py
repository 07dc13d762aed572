"""A name -> function table with one clear error for unknown names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from r1kit.grpo.options import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions registered by name, e.g. `OBJECTIVES = Registry("objective")`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a function under `name` (names are unique)."""

        def decorate(fn: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._table[name] = fn
            return fn

        return decorate

    def __getitem__(self, name: str) -> F:
        try:
            return self._table[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def names(self) -> list[str]:
        return sorted(self._table)
