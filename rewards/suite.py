"""The reward suite: several weighted reward functions scored safely, every training step.

    suite = RewardSuite(["math_accuracy", "format"], weights=[1.0, 0.2])
    result = suite.score(prompts, completions, {"answer": answers}, trainer_state=state)
    result.total            # (N,) weighted sum, the GRPO reward r
    result.scores["format"] # (N,) that function's scores, NaN where it gave None
    result.metrics()        # means, failure and timeout counts, ready to log
    result.extra            # columns the functions added to the completions table (log_extra)
    result.logged_metrics   # scalars the functions logged (log_metric), averaged

Every function is called under TRL's reward contract (`protocol`): the prompts
as the dataset holds them, the completions as TRL passes them (one assistant
message each when the prompts are conversational), the columns, the trainer's
state and the two logging callables. Where each function runs:

- In the suite's worker processes (`num_workers` > 0), for picklable functions
  (anything resolved from "pkg.module:function", the built-in rules):
  - one call with the whole batch, as TRL makes it, under a hard limit of
    `call_timeout_s`: a worker past it is killed and replaced;
  - element-wise functions (`elementwise = True`: the built-in rules) one
    completion per task, each under a hard limit of `timeout_s`, spread over
    the workers.
- In the calling process, the whole batch in one call under `call_timeout_s`,
  for functions marked `batched = True` (reward models and judges, which hold a
  model or a client), `async` functions, functions that cannot be pickled
  (lambdas, closures, anything defined in `__main__`), and every function when
  `num_workers` is 0. This limit is soft: a call past it is abandoned in its
  thread (see `in_process`).

Both kinds run concurrently. Workers are started once and reused; close the
suite (or use it as a context manager) to stop them.

Failures: an exception or a timeout on completion i of reward f is logged with
f's name and i, counted in the result, and then follows `on_error`:
"zero" scores it 0.0, "none" scores it None (NaN), "raise" raises
`RewardError` listing every failure once the whole batch is scored. A batch
call that raises is repeated one completion at a time (in a worker under
`timeout_s` each, in process within what is left of `call_timeout_s`) so that
the error is pinned on the completions that cause it; a batch call that times
out, or whose worker dies, fails on every completion of the batch.

Logging: what a function passes to `log_extra` and `log_metric` in a call that
returned is kept (calls in workers record it and send it back); a call that
failed logs nothing. `result.extra[column]` holds one value per completion
(None where no call logged one; a column several functions log holds the last
one's values; a column of the wrong length is left out, with a warning), and
`result.logged_metrics[name]` the mean of the values logged.

The total: total_i = sum_f w_f * s_fi, with None/NaN scores counted as 0 in the
sum (TRL's nansum), while each function's mean leaves them out.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from r1kit.rewards.in_process import score_in_process
from r1kit.rewards.protocol import (
    TRAINER_KEYWORDS,
    RewardBatch,
    RewardFn,
    is_async_reward,
    is_elementwise,
    reward_name,
    trl_completions,
)
from r1kit.rewards.registry import resolve
from r1kit.rewards.worker_pool import Calls, Outcome, Task, WorkerPool

logger = logging.getLogger(__name__)
ErrorPolicy = Literal["zero", "none", "raise"]
Placement = Literal["worker_batch", "worker_elementwise", "in_process"]
MAX_LOGGED_FAILURES = 5  # per function and call; the rest are summarised in one line


@dataclass
class RewardSuiteConfig:
    """How the suite runs its reward functions.

    timeout_s: hard time limit, in seconds, for scoring one completion with an
        element-wise function in a worker process.
    call_timeout_s: time limit, in seconds, for one whole-batch call: hard in a
        worker process (killed), soft in the calling process (abandoned).
    on_error: what a failed or timed-out score becomes: "zero" (0.0), "none"
        (None: NaN in the matrix, left out of the mean) or "raise" (RewardError).
    num_workers: worker processes for picklable, non-batched, non-async functions;
        0 runs every function in the calling process (soft limits only).
    worker_memory_mb: address-space limit of each worker, in MiB (None: no limit).
    worker_start_timeout_s: how long a worker may take to start and load the functions.
    """

    timeout_s: float = 10.0
    call_timeout_s: float = 300.0
    on_error: ErrorPolicy = "zero"
    num_workers: int = 2
    worker_memory_mb: int | None = 4096
    worker_start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "call_timeout_s", "worker_start_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"RewardSuiteConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.on_error not in ("zero", "none", "raise"):
            raise ValueError(f"RewardSuiteConfig.on_error must be 'zero', 'none' or 'raise', got {self.on_error!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"RewardSuiteConfig.num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.worker_memory_mb is not None and self.worker_memory_mb < 256:
            raise ValueError(f"RewardSuiteConfig.worker_memory_mb must be >= 256 or None, got {self.worker_memory_mb}")


@dataclass(frozen=True)
class RewardFailure:
    """One reward function failing on one completion: kind is "error" or "timeout"."""

    reward: str
    index: int
    kind: Literal["error", "timeout"]
    message: str

    def __str__(self) -> str:
        return f"reward {self.reward!r} {self.kind} on completion {self.index}: {self.message}"


class RewardError(RuntimeError):
    """Raised under on_error="raise" when any reward failed or timed out; `.failures` lists them all."""

    def __init__(self, failures: list[RewardFailure]) -> None:
        self.failures = failures
        shown = "\n  ".join(str(failure) for failure in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} reward failure(s):\n  {shown}{more}")


@dataclass
class RewardResult:
    """Scores of N completions by F reward functions.

    scores: name -> float32 tensor (N,), NaN where the function gave None (or
        failed under on_error="none").
    total: float32 tensor (N,), sum_f weight_f * score_f with NaN counted as 0.
    failures: every error and timeout, with the function's name and the completion's index.
    extra: column -> N values the functions logged with log_extra (None where none was logged).
    logged_metrics: name -> mean of the values the functions logged with log_metric.
    """

    names: list[str]
    weights: list[float]
    scores: dict[str, torch.Tensor]
    total: torch.Tensor
    failures: list[RewardFailure] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)
    logged_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def matrix(self) -> torch.Tensor:
        """(N, F) float32 scores, columns in `names` order."""
        return torch.stack([self.scores[name] for name in self.names], dim=1)

    def count(self, name: str, kind: Literal["error", "timeout"]) -> int:
        """How many completions reward `name` failed on with `kind`."""
        return sum(1 for failure in self.failures if failure.reward == name and failure.kind == kind)

    def mean(self, name: str) -> float:
        """Mean of reward `name` over the completions it scored (None/NaN left out); NaN if none."""
        return _nanmean(self.scores[name])

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Flat scalars to log: per function mean, std, errors, timeouts, not-applicable count; the total."""
        metrics: dict[str, float] = {}
        for name in self.names:
            values = self.scores[name]
            scored = values[~values.isnan()]
            metrics[f"{prefix}{name}/mean"] = _nanmean(values)
            metrics[f"{prefix}{name}/std"] = scored.std().item() if scored.numel() > 1 else 0.0
            metrics[f"{prefix}{name}/errors"] = float(self.count(name, "error"))
            metrics[f"{prefix}{name}/timeouts"] = float(self.count(name, "timeout"))
            metrics[f"{prefix}{name}/not_applicable"] = float(values.isnan().sum().item())
        metrics[f"{prefix}total/mean"] = self.total.mean().item() if self.total.numel() else math.nan
        metrics[f"{prefix}total/std"] = self.total.std().item() if self.total.numel() > 1 else 0.0
        return metrics


def _nanmean(values: torch.Tensor) -> float:
    scored = values[~values.isnan()]
    return scored.mean().item() if scored.numel() else math.nan


def suite_name(spec: str | RewardFn, fn: RewardFn | None = None) -> str:
    """The name reward `spec` has in a suite's scores and metrics: a registered name as given, else the name
    of the function it resolves to (`fn`, when already resolved). A name given twice gets _2, _3, ... there."""
    if isinstance(spec, str) and ":" not in spec:
        return spec
    return reward_name(fn if fn is not None else resolve(spec))


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def _worker_safe(fn: RewardFn) -> bool:
    """Whether `fn` can run in a worker: not batched, not async, and picklable from an importable module."""
    if getattr(fn, "batched", False) or is_async_reward(fn):
        return False
    if getattr(fn, "__module__", None) == "__main__":
        return False
    try:
        pickle.dumps(fn)
    except Exception:
        return False
    return True


def _placement(fn: RewardFn, use_workers: bool) -> Placement:
    """Where and how `fn` is called (see the module docstring)."""
    if not (use_workers and _worker_safe(fn)):
        return "in_process"
    return "worker_elementwise" if is_elementwise(fn) else "worker_batch"


def _check_batch(prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"score() got {len(prompts)} prompts for {len(completions)} completions")
    for key, values in columns.items():
        if key in ("prompts", "completions", *TRAINER_KEYWORDS):
            raise ValueError(f"column {key!r} clashes with the reward contract's own argument; rename it")
        if len(values) != len(completions):
            raise ValueError(f"column {key!r} has {len(values)} values for {len(completions)} completions")


class RewardSuite:
    """Weighted reward functions, scored with time limits and an error policy (see the module docstring)."""

    def __init__(
        self,
        rewards: Sequence[str | RewardFn],
        weights: Sequence[float] | None = None,
        config: RewardSuiteConfig | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("RewardSuite needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"RewardSuite got {len(weights)} weights for {len(rewards)} rewards")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"RewardSuite weights must be finite, got {weights}")
        self.config = config or RewardSuiteConfig()
        self.functions = [resolve(spec) for spec in rewards]
        self.names = _unique_names([suite_name(spec, fn) for spec, fn in zip(rewards, self.functions, strict=True)])
        self.weights = weights
        self._placements = [_placement(fn, self.config.num_workers > 0) for fn in self.functions]
        # the functions the workers load, in their order (a task names its function by this position)
        self._worker_functions = [f for f, where in enumerate(self._placements) if where != "in_process"]
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._start_pool()
        in_process = len(self.functions) - len(self._worker_functions)
        self._threads = ThreadPoolExecutor(in_process, thread_name_prefix="reward") if in_process else None
        if self._pool is not None:  # workers stop with the suite even if close() is never called
            weakref.finalize(self, self._pool.close)

    def _start_pool(self) -> WorkerPool | None:
        if not self._worker_functions:
            return None
        functions = [self.functions[f] for f in self._worker_functions]
        return WorkerPool(
            pickle.dumps(functions),
            self.config.num_workers,
            memory_mb=self.config.worker_memory_mb,
            start_timeout_s=self.config.worker_start_timeout_s,
        )

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: Mapping[str, Sequence[Any]] | None = None,
        *,
        trainer_state: Any = None,
    ) -> RewardResult:
        """Score every completion with every function.

        prompts: one per completion, as the dataset holds them (strings or conversations).
        completions: the decoded texts; when the prompts are conversational the
            functions get each as `[{"role": "assistant", "content": text}]`, as in TRL.
        columns: the dataset's other columns and `completion_ids`, one value per completion.
        trainer_state: passed on as `trainer_state` (a `transformers.TrainerState`
            in training); it must be picklable to reach functions in workers.
        """
        columns = {key: list(values) for key, values in (columns or {}).items()}
        _check_batch(prompts, completions, columns)
        prompts = list(prompts)
        batch = RewardBatch(trl_completions(prompts, completions), prompts, columns, trainer_state)
        with self._lock:
            if self._closed:
                raise RuntimeError("this RewardSuite is closed")
            futures = {
                f: self._threads.submit(score_in_process, fn, batch, self.config.call_timeout_s)
                for f, fn in enumerate(self.functions)
                if self._placements[f] == "in_process"
            }
            calls = self._score_in_workers(batch)
            calls.update({f: future.result() for f, future in futures.items()})
        return self._assemble(calls, len(batch))

    def _worker_tasks(self, n: int) -> list[Task]:
        """A whole-batch task per worker function, or a task per completion for element-wise ones."""
        specs = []
        for slot, f in enumerate(self._worker_functions):
            if self._placements[f] == "worker_batch":
                specs.append((slot, tuple(range(n)), self.config.call_timeout_s))
            else:
                specs += [(slot, (item,), self.config.timeout_s) for item in range(n)]
        return [Task(task_id, *spec) for task_id, spec in enumerate(specs)]

    def _task_batch(self, batch: RewardBatch, task: Task) -> RewardBatch:
        """What `task` sends its worker: its completions, with the trainer's state unless the function is
        element-wise (which does not get it, and should not pay for unpickling it)."""
        selected = batch.select(task.items)
        fn = self.functions[self._worker_functions[task.fn_index]]
        return replace(selected, trainer_state=None) if is_elementwise(fn) else selected

    def _score_in_workers(self, batch: RewardBatch) -> dict[int, Calls]:
        """The calls of the worker functions, by function index; a batch task that raised is replaced
        by one task per completion."""
        calls: dict[int, Calls] = {f: [] for f in self._worker_functions}
        if self._pool is None or not len(batch):
            return calls
        payload = functools.partial(self._task_batch, batch)
        tasks = self._worker_tasks(len(batch))
        outcomes = self._pool.run(tasks, payload)
        raised = [task for task in tasks if outcomes[task.task_id].raised and len(task.items) > 1]
        retries = [
            Task(len(tasks) + k, task.fn_index, (item,), self.config.timeout_s)
            for k, (task, item) in enumerate((task, item) for task in raised for item in task.items)
        ]
        outcomes.update(self._pool.run(retries, payload))
        replaced = {task.task_id for task in raised}
        for task in [task for task in tasks if task.task_id not in replaced] + retries:
            calls[self._worker_functions[task.fn_index]].append((task.items, outcomes[task.task_id]))
        return calls

    def _assemble(self, calls: dict[int, Calls], n: int) -> RewardResult:
        scores: dict[str, torch.Tensor] = {}
        failures: list[RewardFailure] = []
        logs = _Logs(n)
        for f, name in enumerate(self.names):
            scores[name], function_failures = self._function_scores(name, calls[f], n, logs)
            _log_failures(function_failures)
            failures.extend(function_failures)
        if failures and self.config.on_error == "raise":
            raise RewardError(failures)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        stacked = torch.stack([scores[name] for name in self.names], dim=1) if n else torch.zeros(0, len(self.names))
        total = (stacked.nan_to_num(0.0) * weights).sum(dim=1)
        return RewardResult(
            list(self.names), list(self.weights), scores, total, failures, logs.extra, logs.metric_means()
        )

    def _function_scores(
        self, name: str, calls: Calls, n: int, logs: _Logs
    ) -> tuple[torch.Tensor, list[RewardFailure]]:
        """One function's (n,) scores and failures from its calls; the logs of the calls that returned go to `logs`."""
        values = torch.full((n,), math.nan, dtype=torch.float32)
        failures = []
        for items, outcome in calls:
            if outcome.scores is None:
                kind = "timeout" if outcome.timed_out else "error"
                failures += [RewardFailure(name, item, kind, str(outcome.error)) for item in items]
                values[list(items)] = 0.0 if self.config.on_error == "zero" else math.nan
                continue
            for item, score in zip(items, outcome.scores, strict=True):
                if score is not None:
                    values[item] = score
            logs.add(name, items, outcome)
        return values, sorted(failures, key=lambda failure: failure.index)

    def close(self) -> None:
        """Stop the worker processes and threads; the suite cannot score afterwards."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if self._threads is not None:
                self._threads.shutdown(wait=False)
                self._threads = None

    def __enter__(self) -> RewardSuite:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = {
            "worker_batch": "workers, whole batch",
            "worker_elementwise": "workers, per completion",
            "in_process": "in-process",
        }
        placed = [
            f"{name}({where[placement]}, w={weight})"
            for name, placement, weight in zip(self.names, self._placements, self.weights, strict=True)
        ]
        return f"RewardSuite({', '.join(placed)}, {self.config})"


class _Logs:
    """What the calls of one `score()` logged, gathered per completion (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.extra: dict[str, list[Any]] = {}
        self.metrics: dict[str, list[float]] = {}

    def add(self, reward: str, items: tuple[int, ...], outcome: Outcome) -> None:
        """The log of a call of `reward` that returned, on the completions `items`."""
        columns: dict[str, list[Any]] = {}
        for column, values in outcome.log.extra:  # a column logged twice in one call is extended, as in TRL
            columns.setdefault(column, []).extend(values)
        for column, values in columns.items():
            if len(values) != len(items):
                logger.warning(
                    "reward %r logged %d values in column %r for %d completions; the column is left empty there",
                    reward,
                    len(values),
                    column,
                    len(items),
                )
                continue
            target = self.extra.setdefault(column, [None] * self.n)
            for item, value in zip(items, values, strict=True):
                target[item] = value
        for name, value in outcome.log.metrics:
            self.metrics.setdefault(name, []).append(value)

    def metric_means(self) -> dict[str, float]:
        """Each logged metric's mean over the values logged (TRL averages them within a step)."""
        return {name: sum(values) / len(values) for name, values in self.metrics.items()}


def _log_failures(failures: list[RewardFailure]) -> None:
    for failure in failures[:MAX_LOGGED_FAILURES]:
        logger.warning("%s", failure)
    if len(failures) > MAX_LOGGED_FAILURES:
        first = failures[0]
        logger.warning(
            "reward %r: %d more failures in this batch (completions %s)",
            first.reward,
            len(failures) - MAX_LOGGED_FAILURES,
            [failure.index for failure in failures[MAX_LOGGED_FAILURES:]],
        )
