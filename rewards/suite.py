"""The reward suite: several weighted reward functions scored safely, every training step.

    suite = RewardSuite(["math_accuracy", "format"], weights=[1.0, 0.2])
    result = suite.score(prompts, completions, {"answer": answers})   # one row per completion
    result.total            # (N,) weighted sum, the GRPO reward r
    result.scores["format"] # (N,) that function's scores, NaN where it gave None
    result.metrics()        # means, failure and timeout counts, ready to log

Where each function runs:

- In the suite's worker processes (`num_workers` > 0), one completion per task,
  for plain picklable functions (all built-in rule rewards, anything resolved
  from "pkg.module:function"). Each completion has a hard time limit
  (`timeout_s`): a worker past it is killed and replaced.
- In the calling process, the whole batch in one call under `call_timeout_s`,
  for functions marked `batched = True` (reward models, judges), `async`
  functions, functions that cannot be pickled (lambdas, closures, anything
  defined in `__main__`), and every function when `num_workers` is 0. This
  limit is soft: a call past it is abandoned in its thread (see `in_process`).

Both kinds run concurrently. Workers are started once and reused; close the
suite (or use it as a context manager) to stop them.

Failures: an exception or a timeout on completion i of reward f is logged with
f's name and i, counted in the result, and then follows `on_error`:
"zero" scores it 0.0, "none" scores it None (NaN), "raise" raises
`RewardError` listing every failure once the whole batch is scored.

The total: total_i = sum_f w_f * s_fi, with None/NaN scores counted as 0 in the
sum (TRL's nansum), while each function's mean leaves them out.
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from r1kit.rewards.in_process import score_in_process
from r1kit.rewards.protocol import RewardFn, completion_text, is_async_reward, reward_name
from r1kit.rewards.registry import resolve
from r1kit.rewards.worker_pool import Outcome, Task, WorkerPool

logger = logging.getLogger(__name__)
ErrorPolicy = Literal["zero", "none", "raise"]
MAX_LOGGED_FAILURES = 5  # per function and call; the rest are summarised in one line


@dataclass
class RewardSuiteConfig:
    """How the suite runs its reward functions.

    timeout_s: hard time limit, in seconds, for scoring one completion with one
        function in a worker process.
    call_timeout_s: soft limit, in seconds, for one whole-batch call of a
        function that runs in the calling process.
    on_error: what a failed or timed-out score becomes: "zero" (0.0), "none"
        (None: NaN in the matrix, left out of the mean) or "raise" (RewardError).
    num_workers: worker processes for picklable, non-batched functions; 0 runs
        every function in the calling process (soft limits only).
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
    """

    names: list[str]
    weights: list[float]
    scores: dict[str, torch.Tensor]
    total: torch.Tensor
    failures: list[RewardFailure] = field(default_factory=list)

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


def _check_batch(prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"score() got {len(prompts)} prompts for {len(completions)} completions")
    for key, values in columns.items():
        if key in ("prompts", "completions"):
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
        self.names = _unique_names(
            [
                spec if isinstance(spec, str) and ":" not in spec else reward_name(fn)
                for spec, fn in zip(rewards, self.functions, strict=True)
            ]
        )
        self.weights = weights
        use_workers = self.config.num_workers > 0
        self._in_workers = [use_workers and _worker_safe(fn) for fn in self.functions]
        # function index -> its index among the functions loaded by the workers
        self._worker_index = {f: i for i, f in enumerate(f for f, w in enumerate(self._in_workers) if w)}
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._start_pool()
        in_process = len(self.functions) - len(self._worker_index)
        self._threads = ThreadPoolExecutor(in_process, thread_name_prefix="reward") if in_process else None
        if self._pool is not None:  # workers stop with the suite even if close() is never called
            weakref.finalize(self, self._pool.close)

    def _start_pool(self) -> WorkerPool | None:
        if not self._worker_index:
            return None
        functions = [self.functions[f] for f in self._worker_index]
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
    ) -> RewardResult:
        """Score every completion with every function; `columns` hold one value per completion."""
        columns = {key: list(values) for key, values in (columns or {}).items()}
        _check_batch(prompts, completions, columns)
        texts = [completion_text(c) for c in completions]
        prompts = list(prompts)  # strings or conversations: passed on as they are, like TRL does
        with self._lock:
            if self._closed:
                raise RuntimeError("this RewardSuite is closed")
            futures = {
                f: self._threads.submit(score_in_process, fn, texts, prompts, columns, self.config.call_timeout_s)
                for f, fn in enumerate(self.functions)
                if not self._in_workers[f]
            }
            outcomes = self._score_in_workers(texts, prompts, columns)
            outcomes.update({f: future.result() for f, future in futures.items()})
        return self._assemble(outcomes, len(texts))

    def _score_in_workers(
        self, texts: list[str], prompts: list[Any], columns: dict[str, list[Any]]
    ) -> dict[int, list[Outcome]]:
        """Outcomes of the worker-placed functions, by function index; one task per (function, completion)."""
        if self._pool is None or not texts:
            return {f: [Outcome() for _ in texts] for f in self._worker_index}
        tasks = [
            Task(task_id=len(texts) * slot + item, fn_index=slot, item=item)
            for slot in range(len(self._worker_index))
            for item in range(len(texts))
        ]

        def payload(task: Task) -> tuple[Any, ...]:
            row = {key: values[task.item] for key, values in columns.items()}
            return texts[task.item], prompts[task.item], row

        results = self._pool.run(tasks, payload, self.config.timeout_s)
        return {
            f: [results[len(texts) * slot + item] for item in range(len(texts))]
            for f, slot in self._worker_index.items()
        }

    def _assemble(self, outcomes: dict[int, list[Outcome]], n: int) -> RewardResult:
        failure_value = 0.0 if self.config.on_error == "zero" else math.nan
        scores: dict[str, torch.Tensor] = {}
        failures: list[RewardFailure] = []
        for f, name in enumerate(self.names):
            values = torch.full((n,), math.nan, dtype=torch.float32)
            function_failures = []
            for item, outcome in enumerate(outcomes[f]):
                if outcome.timed_out or outcome.error is not None:
                    kind = "timeout" if outcome.timed_out else "error"
                    message = self._timeout_message(f) if outcome.timed_out else str(outcome.error)
                    function_failures.append(RewardFailure(name, item, kind, message))
                    values[item] = failure_value
                elif outcome.score is not None:
                    values[item] = outcome.score
            _log_failures(function_failures)
            failures.extend(function_failures)
            scores[name] = values
        if failures and self.config.on_error == "raise":
            raise RewardError(failures)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        stacked = torch.stack([scores[name] for name in self.names], dim=1) if n else torch.zeros(0, len(self.names))
        total = (stacked.nan_to_num(0.0) * weights).sum(dim=1)
        return RewardResult(list(self.names), list(self.weights), scores, total, failures)

    def _timeout_message(self, f: int) -> str:
        if self._in_workers[f]:
            return f"exceeded {self.config.timeout_s} s; the worker was killed"
        return f"the batch call exceeded {self.config.call_timeout_s} s"

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
        placed = [
            f"{n}({'workers' if w else 'in-process'}, w={wt})"
            for n, w, wt in zip(self.names, self._in_workers, self.weights, strict=False)
        ]
        return f"RewardSuite({', '.join(placed)}, {self.config})"


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
