"""Run one batched reward in a process of its own, with a hard time limit per call.

    rm = IsolatedReward(functools.partial(RewardModelReward, "path/to/rm", device="cuda:1"),
                        env={"CUDA_VISIBLE_DEVICES": "1"}, timeout_s=120)
    suite = RewardSuite([rm, "math_accuracy"])

`factory` is pickled to a dedicated worker process (`r1kit.rewards.worker_main`) and
called there once, so the reward (a reward model, a judge with its client) is
built in that process, on the device and with the environment given, and never
pickled itself. Each call sends the whole batch (completions and prompts as it
got them, the columns and the trainer's state) and waits at most `timeout_s`;
past that the process is killed (its memory and device with it) and the call
raises TimeoutError, which the suite records as a timeout of every completion
in the batch. The next call starts a fresh process. What the reward logs in its
process (`log_extra`, `log_metric`) comes back with the scores and is replayed
into the callables this call was given. The factory must be
importable by reference (a module-level function or class, or a
functools.partial of one).
"""

from __future__ import annotations

import pickle
import select
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from r1kit.rewards.protocol import RewardBatch, RewardFn, check_scores, reward_name
from r1kit.rewards.worker_pool import WorkerProcess, WorkerStartError, worker_command, worker_env


def _factory_name(factory: Callable[[], RewardFn]) -> str:
    target = getattr(factory, "func", factory)  # functools.partial
    return getattr(target, "__name__", type(target).__name__)


class IsolatedReward:
    """A reward built by `factory` inside its own worker process (see the module docstring)."""

    batched = True

    def __init__(
        self,
        factory: Callable[[], RewardFn],
        *,
        name: str | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
        memory_mb: int | None = None,
    ) -> None:
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"IsolatedReward timeouts must be positive, got {timeout_s}, {start_timeout_s}")
        try:
            self._factory_pickle = pickle.dumps([factory])
        except Exception as error:
            raise TypeError(f"IsolatedReward: the factory {factory!r} cannot be pickled: {error}") from error
        self.__name__ = name or _factory_name(factory)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._env = {**worker_env(), **(env or {})}
        self._command = worker_command(memory_mb)
        self._lock = threading.Lock()
        self._process: WorkerProcess | None = None

    def _reply(self, process: WorkerProcess, deadline: float, what: str) -> tuple[Any, ...]:
        """The next message from `process`; kills it and raises TimeoutError past `deadline`."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop()
                raise TimeoutError(f"reward {self.__name__!r}: {what} exceeded its time limit; process killed")
            if select.select([process], [], [], remaining)[0]:
                messages = process.read_messages()
                if messages is None:
                    code = self._stop()
                    raise RuntimeError(f"reward {self.__name__!r}: its process exited with code {code}")
                if messages:
                    return messages[0]

    def _started(self) -> WorkerProcess:
        if self._process is None:
            process = WorkerProcess(self._command, self._env, self._factory_pickle, build=True)
            self._process = process
            reply = self._reply(process, time.monotonic() + self.start_timeout_s, "starting")
            if reply[0] != "ready":
                self._stop()
                raise WorkerStartError(f"reward {self.__name__!r} could not be built in its process:\n{reply[1]}")
        return self._process

    def __call__(
        self,
        completions: list[Any],
        *,
        prompts: list[Any],
        trainer_state: Any = None,
        log_extra: Callable[[str, list], None] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        """Score the batch in the reward's process; what the reward logs there is replayed into
        `log_extra` and `log_metric`."""
        batch = RewardBatch(list(completions), list(prompts), columns, trainer_state)
        with self._lock:
            process = self._started()
            process.send(("score", [(0, 0, batch)]))
            _, _, scores, error, log = self._reply(process, time.monotonic() + self.timeout_s, "a call")
        if error is not None:
            raise RuntimeError(f"reward {self.__name__!r} failed in its process:\n{error}")
        log.replay(log_extra, log_metric)
        return check_scores(scores, len(batch), reward_name(self))

    def _stop(self) -> int:
        process, self._process = self._process, None
        return process.kill() if process is not None else 0

    def close(self) -> None:
        """Stop the process (the next call would start a new one)."""
        with self._lock:
            self._stop()

    def __del__(self) -> None:
        if getattr(self, "_process", None) is not None:
            self._stop()
