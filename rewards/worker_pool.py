"""Persistent reward worker processes with a hard time limit on every call.

Workers are plain subprocesses (`python -m r1kit.rewards.worker_main`), not
multiprocessing children: they start the same way from the main thread, from
any other thread, and from inside processes that torch.multiprocessing,
accelerate or a daemonic multiprocessing pool started, and they never re-import
the caller's `__main__`. Each loads the reward functions once and is reused
across calls.

A task is one call of one function on some completions: the whole batch, or
one completion (element-wise functions). The parent hands each idle worker a
chunk of tasks (a task covering several completions goes alone) and
multiplexes the replies with `select`. A worker answers task by task, so the
parent always knows which task it is on and since when; past that task's time
limit it kills the worker's whole process group (SIGKILL: nothing in Python can
catch it), records a timeout for that task, puts the rest of the chunk back in
the queue and starts a fresh worker. A worker that dies on its own (a crash,
`os._exit`, the OOM killer) costs only the task it was on, which is recorded as
an error. Nothing is retried, so a completion that kills workers cannot loop
the run.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r1kit.rewards.channel import encode_frame, split_frames
from r1kit.rewards.protocol import RewardBatch, RewardLog

_POLL_S = 0.5  # longest wait between checks of the deadlines
MAX_CHUNK = 32  # most tasks sent to a worker at once


@dataclass(frozen=True)
class Task:
    """Call reward function `fn_index` on completions `items` (indices into the batch) within `timeout_s`."""

    task_id: int
    fn_index: int
    items: tuple[int, ...]
    timeout_s: float


@dataclass(frozen=True)
class Outcome:
    """How one call of one reward function on some completions ended.

    scores: one per completion (None = not applicable), when the call returned.
    error: why there are no scores: the exception the call raised, the worker's
        exit, or the time limit it ran past.
    timed_out: the call ran past its time limit.
    raised: the call raised an exception (the suite then scores its completions one at a time).
    log: what the call logged through log_extra and log_metric (empty unless it returned).
    """

    scores: list[float | None] | None = None
    error: str | None = None
    timed_out: bool = False
    raised: bool = False
    log: RewardLog = field(default_factory=RewardLog)


# How one function scored a batch: its calls, each with the completions (indices) it covered.
Calls = list[tuple[tuple[int, ...], Outcome]]


class WorkerStartError(RuntimeError):
    """A worker could not load the reward functions or did not start in time."""


def worker_command(memory_mb: int | None) -> list[str]:
    """Command line that starts a reward worker with an optional address-space limit in MiB."""
    return [sys.executable, "-m", "r1kit.rewards.worker_main", str(memory_mb or 0)]


class WorkerProcess:
    """One worker process and the tasks it has been sent but not yet answered (running task first)."""

    def __init__(self, command: list[str], env: dict[str, str], functions_pickle: bytes, build: bool) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0, start_new_session=True
        )
        self.buffer = bytearray()
        self.ready = False
        self.tasks: deque[Task] = deque()
        self.since = time.monotonic()  # when the running task started (or when the process was spawned)
        self.send(("load", functions_pickle, build))

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, message: Any) -> None:
        self.process.stdin.write(encode_frame(message))

    def read_messages(self) -> list[Any] | None:
        """Messages that arrived; None when the worker closed its end (it exited)."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        self.buffer.extend(data)
        return split_frames(self.buffer)

    def kill(self) -> int:
        """SIGKILL the worker's process group; returns its exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        return code


def worker_env() -> dict[str, str]:
    """The caller's environment, plus its sys.path so workers import what the caller imports."""
    env = dict(os.environ)
    paths = [path or os.getcwd() for path in sys.path if isinstance(path, str)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class WorkerPool:
    """`num_workers` processes that run reward calls (tasks) under a per-task time limit."""

    def __init__(
        self, functions_pickle: bytes, num_workers: int, *, memory_mb: int | None, start_timeout_s: float
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"WorkerPool needs num_workers >= 1, got {num_workers}")
        self._command = worker_command(memory_mb)
        self._env = worker_env()
        self._functions_pickle = functions_pickle
        self._start_timeout_s = start_timeout_s
        self._workers = [self._spawn() for _ in range(num_workers)]
        while not all(worker.ready for worker in self._workers):
            self._receive({}, deque(), timeout_s=_POLL_S)
            self._check_starts()

    def _spawn(self) -> WorkerProcess:
        return WorkerProcess(self._command, self._env, self._functions_pickle, build=False)

    def run(self, tasks: list[Task], payload: Callable[[Task], RewardBatch]) -> dict[int, Outcome]:
        """Outcome of every task, by task_id; `payload(task)` is what the task's call is given."""
        pending = deque(tasks)
        outcomes: dict[int, Outcome] = {}
        poll_s = min([_POLL_S, *(task.timeout_s for task in tasks)])
        while len(outcomes) < len(tasks):
            self._dispatch(pending, payload)
            self._receive(outcomes, pending, timeout_s=poll_s)
            self._enforce_deadlines(outcomes, pending)
            self._check_starts()
        return outcomes

    def _next_chunk(self, pending: deque[Task]) -> list[Task]:
        """The tasks to send one idle worker: a task covering several completions alone, else up to
        MAX_CHUNK single-completion tasks, fewer when there are few tasks per worker."""
        if len(pending[0].items) > 1:
            return [pending.popleft()]
        size = max(1, min(MAX_CHUNK, len(pending) // (2 * len(self._workers))))
        chunk = []
        while pending and len(chunk) < size and len(pending[0].items) == 1:
            chunk.append(pending.popleft())
        return chunk

    def _dispatch(self, pending: deque[Task], payload: Callable[[Task], RewardBatch]) -> None:
        idle = [worker for worker in self._workers if worker.ready and not worker.tasks]
        for worker in idle:
            if not pending:
                return
            chunk = self._next_chunk(pending)
            worker.tasks.extend(chunk)
            worker.since = time.monotonic()
            message = ("score", [(t.task_id, t.fn_index, payload(t)) for t in chunk])
            try:
                worker.send(message)
            except BrokenPipeError:  # it died while idle: requeue, and the next _receive replaces it
                pending.extendleft(reversed(chunk))
                worker.tasks.clear()

    def _receive(self, outcomes: dict[int, Outcome], pending: deque[Task], timeout_s: float) -> None:
        readable, _, _ = select.select(self._workers, [], [], timeout_s)
        for worker in readable:
            messages = worker.read_messages()
            if messages is None:
                if not worker.ready:
                    raise WorkerStartError(f"a reward worker exited with code {worker.kill()} while starting")
                running, code = self._replace(worker, pending)
                if running is not None:
                    outcomes[running.task_id] = Outcome(error=f"the worker process exited with code {code}")
                continue
            for message in messages:
                self._handle(worker, message, outcomes)

    def _handle(self, worker: WorkerProcess, message: tuple[Any, ...], outcomes: dict[int, Outcome]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "load_error":
            worker.kill()
            raise WorkerStartError(f"a reward worker could not load the reward functions:\n{message[1]}")
        else:
            _, task_id, scores, error, log = message
            worker.tasks.popleft()
            worker.since = time.monotonic()
            outcomes[task_id] = Outcome(scores=scores, error=error, raised=error is not None, log=log)

    def _enforce_deadlines(self, outcomes: dict[int, Outcome], pending: deque[Task]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.tasks and now - worker.since > worker.tasks[0].timeout_s:
                running, _ = self._replace(worker, pending)
                message = f"exceeded {running.timeout_s} s; the worker was killed"
                outcomes[running.task_id] = Outcome(error=message, timed_out=True)

    def _replace(self, worker: WorkerProcess, pending: deque[Task]) -> tuple[Task | None, int]:
        """Kill `worker`, requeue the tasks queued behind its running one, respawn it; returns the
        running task (None if it was idle) and the worker's exit code."""
        code = worker.kill()
        running = worker.tasks[0] if worker.tasks else None
        pending.extendleft(reversed(list(worker.tasks)[1:]))
        self._workers[self._workers.index(worker)] = self._spawn()
        return running, code

    def _check_starts(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if not worker.ready and now - worker.since > self._start_timeout_s:
                self.close()
                raise WorkerStartError(f"a reward worker did not start within {self._start_timeout_s} s")

    def close(self) -> None:
        """Stop every worker: close its input so it exits, then kill whatever is left."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.process.stdin.close()
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            worker.kill()
        self._workers = []
