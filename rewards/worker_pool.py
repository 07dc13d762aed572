"""Persistent reward worker processes with a hard time limit on every completion.

Workers are plain subprocesses (`python -m r1kit.rewards.worker_main`), not
multiprocessing children: they start the same way from the main thread, from
any other thread, and from inside processes that torch.multiprocessing,
accelerate or a daemonic multiprocessing pool started, and they never re-import
the caller's `__main__`. Each loads the reward functions once and is reused
across calls.

The parent hands each idle worker a chunk of tasks (one function, one
completion each) and multiplexes the replies with `select`. A worker answers
task by task, so the parent always knows which completion it is on and since
when; past the time limit it kills the worker's whole process group (SIGKILL:
nothing in Python can catch it), records a timeout for that completion, puts
the rest of the chunk back in the queue and starts a fresh worker. A worker
that dies on its own (a crash, `os._exit`, the OOM killer) costs only the
completion it was on, which is recorded as an error. Nothing is retried, so a
completion that kills workers cannot loop the run.
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
from dataclasses import dataclass
from typing import Any

from r1kit.rewards.channel import encode_frame, split_frames

_POLL_S = 0.5  # longest wait between checks of the deadlines


@dataclass(frozen=True)
class Task:
    """Score completion `item` with reward function `fn_index`; `task_id` keys its outcome."""

    task_id: int
    fn_index: int
    item: int


@dataclass(frozen=True)
class Outcome:
    """One (function, completion): a score (None = not applicable), an error message, or a timeout."""

    score: float | None = None
    error: str | None = None
    timed_out: bool = False


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
    """`num_workers` processes that score (function, completion) tasks under a per-task time limit."""

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

    def run(
        self, tasks: list[Task], payload: Callable[[Task], tuple[Any, ...]], timeout_s: float
    ) -> dict[int, Outcome]:
        """Outcome of every task, by task_id. `payload(task)` gives (completion, prompt, row_columns)."""
        pending = deque(tasks)
        outcomes: dict[int, Outcome] = {}
        while len(outcomes) < len(tasks):
            self._dispatch(pending, payload)
            self._receive(outcomes, pending, timeout_s=min(_POLL_S, timeout_s))
            self._enforce_deadlines(outcomes, pending, timeout_s)
            self._check_starts()
        return outcomes

    def _dispatch(self, pending: deque[Task], payload: Callable[[Task], tuple[Any, ...]]) -> None:
        idle = [worker for worker in self._workers if worker.ready and not worker.tasks]
        for worker in idle:
            if not pending:
                return
            size = max(1, min(32, len(pending) // (2 * len(self._workers))))
            chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
            worker.tasks.extend(chunk)
            worker.since = time.monotonic()
            message = ("score", [(t.task_id, t.fn_index, *payload(t)) for t in chunk])
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
                self._replace(
                    worker,
                    outcomes,
                    pending,
                    lambda code: Outcome(error=f"the worker process exited with code {code}"),
                )
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
            _, task_id, score, error = message
            worker.tasks.popleft()
            worker.since = time.monotonic()
            outcomes[task_id] = Outcome(score=score, error=error)

    def _enforce_deadlines(self, outcomes: dict[int, Outcome], pending: deque[Task], timeout_s: float) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.tasks and now - worker.since > timeout_s:
                self._replace(worker, outcomes, pending, lambda code: Outcome(timed_out=True))

    def _replace(
        self,
        worker: WorkerProcess,
        outcomes: dict[int, Outcome],
        pending: deque[Task],
        outcome_of: Callable[[int], Outcome],
    ) -> None:
        """Kill `worker`, give its running task `outcome_of(exit_code)`, requeue its other tasks, respawn."""
        code = worker.kill()
        if worker.tasks:
            outcomes[worker.tasks[0].task_id] = outcome_of(code)
            pending.extendleft(reversed(list(worker.tasks)[1:]))
        self._workers[self._workers.index(worker)] = self._spawn()

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
