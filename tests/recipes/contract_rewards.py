"""Reward functions the recipe tests name by import path: each scores 1.0 when it got what TRL's contract promises."""

from __future__ import annotations


def sees_extra_columns(completions, prompts, solution, difficulty, **kwargs) -> list[float]:
    """1.0 per completion when the dataset's extra columns arrive, one value per completion."""
    ok = len(solution) == len(difficulty) == len(completions) and all(isinstance(d, int) for d in difficulty)
    return [1.0 if ok else 0.0] * len(completions)


def sees_conversations(completions, prompts, **kwargs) -> list[float]:
    """1.0 per completion that arrives as a list of messages, after a prompt that is one (TRL's conversational form)."""
    as_messages = lambda value: isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)
    return [1.0 if as_messages(c) and as_messages(p) else 0.0 for c, p in zip(completions, prompts, strict=True)]
