"""Errors a remote rollout engine raises; each names the worker it is about."""

from __future__ import annotations


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed a request; `worker` is its name ("rollout worker 0 (127.0.0.1:7301, pid 123)")."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"{worker}: {message}")
        self.worker = worker


class RolloutWorkerDied(RolloutWorkerError):
    """The worker's process ended or its connection closed."""


class RolloutWorkerTimeout(RolloutWorkerError, TimeoutError):
    """The worker did not answer within the configured time."""
