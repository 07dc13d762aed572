"""The reward contract and the one place that calls a reward function.

A reward function is any callable

    fn(completions: list[str], *, prompts: list[str], **dataset_columns) -> list[float | None]

with one score per completion; `None` means "not applicable" (for example, no
reference answer) and is left out of that function's mean instead of counting
as 0. This is TRL's reward-function contract, so TRL reward functions work
unchanged; `async def` functions are awaited. `dataset_columns` hold the
dataset's other columns repeated per completion (`answer=["38", "38", ...]`).

`call_reward` passes only the keyword arguments a function accepts (all of them
when it takes `**kwargs`), awaits coroutines, and checks the output: a list of
the right length whose items are real numbers, bools or None. Anything else
raises `RewardOutputError` naming the function, so a bad return value is never
silently turned into a score.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[..., Any]  # fn(completions, *, prompts, **columns) -> list[float | None] (or awaitable)


class RewardOutputError(TypeError):
    """A reward function returned something other than one float-or-None per completion."""


def reward_name(fn: RewardFn) -> str:
    """The name a reward function has in metrics: its `__name__`, else its class name."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name else type(fn).__name__


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or a conversational completion (list of messages) whose last
    message's "content" is the text, as TRL passes for chat datasets."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def is_async_reward(fn: RewardFn) -> bool:
    """True for `async def` functions and objects whose `__call__` is `async def`."""
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _keywords(fn: RewardFn) -> tuple[set[str], bool]:
    """Names `fn` accepts by keyword, and whether it also takes **kwargs (then every name is accepted)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: pass everything
        return set(), True
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_reward(
    fn: RewardFn, completions: list[str], prompts: list[str], columns: Mapping[str, Sequence[Any]]
) -> list[float | None]:
    """Call `fn` under the contract and return its checked scores (float or None, one per completion)."""
    names, takes_any = _keywords(fn)
    kwargs = {"prompts": prompts, **columns}
    if not takes_any:
        kwargs = {key: value for key, value in kwargs.items() if key in names}
    if "completions" in names:  # TRL passes it by keyword; the first parameter may be `prompts`
        kwargs["completions"] = completions
        output = fn(**kwargs)
    else:
        output = fn(completions, **kwargs)
    if inspect.isawaitable(output):
        output = asyncio.run(_await(output))
    return check_scores(output, len(completions), reward_name(fn))


async def _await(awaitable: Any) -> Any:
    return await awaitable


def check_scores(output: Any, expected: int, name: str) -> list[float | None]:
    """Validate a reward function's output: `expected` items, each a finite real number, bool or None."""
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        if hasattr(output, "tolist"):  # a tensor or array of scores
            output = output.tolist()
        else:
            raise RewardOutputError(f"reward {name!r} returned {type(output).__name__}, expected a list")
    if len(output) != expected:
        raise RewardOutputError(f"reward {name!r} returned {len(output)} scores for {expected} completions")
    scores: list[float | None] = []
    for index, value in enumerate(output):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            scores.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            scores.append(float(value))
        else:
            raise RewardOutputError(
                f"reward {name!r} returned {value!r} ({type(value).__name__}) for completion {index}, "
                "expected a finite float or None"
            )
    return scores
