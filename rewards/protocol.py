"""The reward contract and the one place that calls a reward function.

A reward function is any callable

    fn(completions, *, prompts, completion_ids, trainer_state, log_extra, log_metric, **dataset_columns)
        -> list[float | None]

with one score per completion; `None` means "not applicable" (for example, no
reference answer) and is left out of that function's mean instead of counting
as 0. This is the contract of TRL's GRPOTrainer (trl 1.16,
`GRPOTrainer._calculate_rewards`), so TRL reward functions work unchanged:

- `prompts` are the dataset's prompts as it holds them: strings, or
  conversations (lists of {"role", "content"} messages);
- `completions` are strings for string prompts and, when the prompts are
  conversational, one assistant message per completion,
  `[{"role": "assistant", "content": text}]` (`trl_completions`);
- `completion_ids` (the completions' token ids) and the dataset's other columns
  arrive as columns, one value per completion (`answer=["38", "38", ...]`);
- `trainer_state` is the trainer's `transformers.TrainerState` (None outside
  training), and `log_extra(column, values)` / `log_metric(name, value)` add a
  column to the logged completions table / a scalar to the step's metrics
  (`RewardLog` records them).

`call_reward` passes only the keyword arguments a function accepts (all of them
when it takes `**kwargs`), awaits coroutines, and checks the output: a list of
the right length whose items are real numbers, bools or None. Anything else
raises `RewardOutputError` naming the function, so a bad return value is never
silently turned into a score.

A function with `elementwise = True` (the built-in rules) declares that it
scores each completion from that completion's text, prompt and columns alone:
the suite may call it one completion at a time, and it gets neither
`trainer_state` nor the logging callables.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., Any]  # fn(completions, *, prompts, **columns) -> list[float | None] (or awaitable)
TRAINER_KEYWORDS = ("trainer_state", "log_extra", "log_metric")  # what TRL passes besides the data


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


def is_conversational(prompt: Any) -> bool:
    """TRL's test for a conversational prompt (`trl.data_utils.is_conversational`): a list whose first
    item is a dict with a "role".

    >>> is_conversational([{"role": "user", "content": "1 + 1?"}]), is_conversational("1 + 1?")
    (True, False)
    """
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def trl_completions(prompts: Sequence[Any], completions: Sequence[Any]) -> list[Any]:
    """The completions as TRL's GRPOTrainer passes them to reward functions.

    TRL 1.16 (`GRPOTrainer._generate`) decodes each completion's ids without
    special tokens and, when the batch's first prompt is conversational, wraps
    each text in one assistant message (no prefill from the prompt: prompts are
    always rendered with `add_generation_prompt=True`). Completions that are
    already messages are kept as they are.

    >>> trl_completions([[{"role": "user", "content": "1 + 1?"}]], ["2"])
    [[{'role': 'assistant', 'content': '2'}]]
    >>> trl_completions(["1 + 1 ="], [" 2"])
    [' 2']
    """
    if not prompts or not is_conversational(prompts[0]):
        return list(completions)
    return [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]


def is_elementwise(fn: RewardFn) -> bool:
    """Whether `fn` declares that it scores each completion on its own (`fn.elementwise = True`)."""
    return getattr(fn, "elementwise", False) is True


def is_async_reward(fn: RewardFn) -> bool:
    """True for `async def` functions and objects whose `__call__` is `async def`."""
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


@dataclass
class RewardLog:
    """What one call of a reward function logged through `log_extra` and `log_metric`.

    TRL's meaning (trl 1.16, `GRPOTrainer._log_completion_extra` and `_log_metric`):
    `log_extra(column, values)` adds `values`, one per completion of the call, to
    a column of the logged completions table; `log_metric(name, value)` adds a
    scalar to the step's metrics, where the values logged in a step are averaged.
    A log is plain data: a worker process records into one and sends it back.

    >>> log = RewardLog()
    >>> log.log_extra("parsed", ["38", None]); log.log_metric("parse_rate", 0.5)
    >>> log.extra, log.metrics
    ([('parsed', ['38', None])], [('parse_rate', 0.5)])
    """

    extra: list[tuple[str, list[Any]]] = field(default_factory=list)
    metrics: list[tuple[str, float]] = field(default_factory=list)

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """Add `values` (one per completion of the call) to the completions table's `column`."""
        if not isinstance(column, str):
            raise TypeError(f"log_extra: the column name must be a string, got {column!r}")
        self.extra.append((column, list(values)))

    def log_metric(self, name: str, value: float) -> None:
        """Add the scalar `value` to the step's metric `name`."""
        if not isinstance(name, str):
            raise TypeError(f"log_metric: the metric name must be a string, got {name!r}")
        self.metrics.append((name, float(value)))

    def replay(
        self, log_extra: Callable[[str, list], None] | None, log_metric: Callable[[str, float], None] | None
    ) -> None:
        """Make the same calls to `log_extra` and `log_metric` (a log recorded in another process); a
        callable that is None is skipped, as a TRL reward skips logging outside a trainer."""
        if log_extra is not None:
            for column, values in self.extra:
                log_extra(column, values)
        if log_metric is not None:
            for name, value in self.metrics:
                log_metric(name, value)


@dataclass(frozen=True)
class RewardBatch:
    """What a reward call is given besides the logging callables: the completions (as TRL passes them),
    their prompts and dataset columns (one value per completion), and the trainer's state."""

    completions: list[Any]
    prompts: list[Any]
    columns: Mapping[str, list[Any]]
    trainer_state: Any = None

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, items: Sequence[int]) -> RewardBatch:
        """The completions at `items` (indices), with their prompts and columns.

        >>> RewardBatch(["a", "b"], ["p", "q"], {"answer": ["1", "2"]}).select([1])
        RewardBatch(completions=['b'], prompts=['q'], columns={'answer': ['2']}, trainer_state=None)
        """
        return RewardBatch(
            completions=[self.completions[i] for i in items],
            prompts=[self.prompts[i] for i in items],
            columns={key: [values[i] for i in items] for key, values in self.columns.items()},
            trainer_state=self.trainer_state,
        )

    def score(self, fn: RewardFn, log: RewardLog | None = None) -> list[float | None]:
        """`call_reward` on this batch; `fn`'s log_extra and log_metric record into `log`."""
        return call_reward(fn, self.completions, self.prompts, self.columns, trainer_state=self.trainer_state, log=log)


def _keywords(fn: RewardFn) -> tuple[set[str], bool]:
    """Names `fn` accepts by keyword, and whether it also takes **kwargs (then every name is accepted)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: pass everything
        return set(), True
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def call_reward(
    fn: RewardFn,
    completions: list[Any],
    prompts: list[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    trainer_state: Any = None,
    log: RewardLog | None = None,
) -> list[float | None]:
    """Call `fn` under the contract and return its checked scores (float or None, one per completion).

    Unless `fn` is element-wise, it also gets `trainer_state` and the logging
    callables, which record into `log` (a fresh one, dropped, when None).
    """
    names, takes_any = _keywords(fn)
    kwargs = {"prompts": prompts, **columns}
    if not is_elementwise(fn):
        log = log if log is not None else RewardLog()
        kwargs.update(trainer_state=trainer_state, log_extra=log.log_extra, log_metric=log.log_metric)
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
