"""Configuration helpers: `option(default, help)` fields and the ConfigError for bad user input."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (shown by `--help` in the recipes)."""
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """Bad user input (a flag, a config value, a dataset, a path): reported in one line, without a traceback."""
