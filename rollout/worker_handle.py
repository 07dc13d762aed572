"""The trainer's side of one worker: its control connection, bounded waits, and how it died.

Every wait polls the connection in short slices until a deadline. A worker
whose process ends closes its socket, which wakes the poll at once; a worker
this trainer launched is also checked through its process, so its exit code
(or the signal that killed it) ends up in the error. A worker that hangs hits
the deadline and raises `RolloutWorkerTimeout`; its late reply, if it ever
comes, is discarded (`abandon`), so the connection stays in step.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.connection import Client, Connection

from r1kit.rollout.errors import RolloutWorkerDied, RolloutWorkerError, RolloutWorkerTimeout
from r1kit.rollout.launch import WorkerProcess
from r1kit.rollout.messages import Failure, Hello, WorkerInfo


class WorkerHandle:
    """One connected worker. `index` is its position in the engine; `process` is set if this trainer started it."""

    def __init__(
        self,
        index: int,
        address: tuple[str, int],
        connection: Connection,
        *,
        process: WorkerProcess | None,
        poll_interval_s: float,
    ) -> None:
        self.index, self.address, self.connection, self.process = index, address, connection, process
        self.poll_interval_s = poll_interval_s
        self.info: WorkerInfo | None = None
        self._stale_replies = 0

    @classmethod
    def open(
        cls,
        index: int,
        address: tuple[str, int],
        authkey: bytes,
        *,
        timeout_s: float,
        poll_interval_s: float,
        process: WorkerProcess | None = None,
    ) -> WorkerHandle:
        """Connects (retrying while the worker is still loading its model) and exchanges Hello."""
        name = _name(index, address, process.pid if process else None)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                connection = Client(address, family="AF_INET", authkey=authkey)
                break
            except ConnectionRefusedError as error:
                if time.monotonic() > deadline:
                    raise RolloutWorkerTimeout(name, f"refused connections for {timeout_s:g}s") from error
                if process is not None and process.exit_code() is not None:
                    raise RolloutWorkerDied(name, f"exited with code {process.exit_code()}") from error
                time.sleep(poll_interval_s)
            except Exception as error:  # AuthenticationError and its relatives
                raise RolloutWorkerError(
                    name, f"refused the handshake ({error}); both sides need the same R1KIT_ROLLOUT_AUTHKEY"
                ) from error
        handle = cls(index, address, connection, process=process, poll_interval_s=poll_interval_s)
        handle.send(Hello())
        handle.info = handle.receive(time.monotonic() + timeout_s, "hello", timeout_s)
        return handle

    @property
    def name(self) -> str:
        pid = self.info.pid if self.info is not None else (self.process.pid if self.process else None)
        return _name(self.index, self.address, pid)

    def send(self, request: object) -> None:
        try:
            self.connection.send(request)
        except (OSError, ValueError) as error:
            raise RolloutWorkerDied(self.name, f"{self._ending()} (sending {type(request).__name__})") from error

    def receive(self, deadline: float, what: str, timeout_s: float) -> object:
        """The reply to the oldest unanswered request; raises Died, Timeout, or Error for a Failure reply."""
        while True:
            reply = self._next_reply(deadline, what, timeout_s)
            if self._stale_replies == 0:
                break
            self._stale_replies -= 1  # the answer to a request given up on earlier
        if isinstance(reply, Failure):
            raise RolloutWorkerError(self.name, f"{what} failed: {reply.error}: {reply.message}")
        return reply

    def _next_reply(self, deadline: float, what: str, timeout_s: float) -> object:
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self.connection.poll(min(max(remaining, 0.0), self.poll_interval_s)):
                    return self.connection.recv()
            except (EOFError, OSError) as error:
                raise RolloutWorkerDied(self.name, f"{self._ending()} during {what}") from error
            if self.process is not None and self.process.exit_code() is not None:
                raise RolloutWorkerDied(self.name, f"{self._ending()} during {what}")
            if remaining <= 0:
                raise RolloutWorkerTimeout(self.name, f"did not answer {what} within {timeout_s:g}s")

    def abandon(self) -> None:
        """Give up on the outstanding request; its reply will be discarded when it arrives."""
        self._stale_replies += 1

    def close(self) -> None:
        self.connection.close()

    def _ending(self) -> str:
        if self.process is None:
            return "closed its connection (process ended or network lost)"
        self.process.wait(1.0)  # the socket closes a moment before the process is reaped
        code = self.process.exit_code()
        if code is None:
            return "closed its connection"
        if code < 0:
            return f"died (killed by {signal.Signals(-code).name})"
        return f"died (exit code {code})"


def _name(index: int, address: tuple[str, int], pid: int | None) -> str:
    where = f"{address[0]}:{address[1]}" + (f", pid {pid}" if pid is not None else "")
    return f"rollout worker {index} ({where})"
