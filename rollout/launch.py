"""Starting worker processes on this machine, and making sure none outlives the trainer.

Each worker runs `python -m r1kit.rollout.serve` in its own session (so it and
everything it spawns, e.g. vLLM's GPU processes, form one process group that
`kill` ends at once), under the trainer's interpreter (so with the same
installed r1kit), the authkey in its environment (never on the command line, which
other users can read), and `--parent_pid` so it exits if the trainer dies
without closing it. It binds port 0 and reports the port it got through a
file; `start` waits for that file, the process's exit, or the timeout,
whichever comes first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from r1kit.rollout.errors import RolloutWorkerDied, RolloutWorkerTimeout
from r1kit.rollout.messages import AUTHKEY_ENV
from r1kit.rollout.serve import WorkerOptions, worker_command


class WorkerProcess:
    """A worker process this trainer started; `kill` ends its whole process group."""

    def __init__(self, popen: subprocess.Popen, port: int, scratch: Path) -> None:
        self.popen, self.port, self._scratch = popen, port, scratch

    @classmethod
    def start(
        cls,
        model: str,
        options: WorkerOptions,
        *,
        name: str,
        authkey: bytes,
        timeout_s: float,
        visible_devices: str | None = None,
    ) -> WorkerProcess:
        """Starts a worker and waits until it listens; raises RolloutWorkerDied / RolloutWorkerTimeout naming it."""
        scratch = Path(tempfile.mkdtemp(prefix="r1kit-worker-"))
        port_file = scratch / "port"
        command = worker_command(model, options, port_file=str(port_file), parent_pid=os.getpid())
        popen = subprocess.Popen(
            command, env=_worker_env(authkey, visible_devices), stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if popen.poll() is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                raise RolloutWorkerDied(
                    f"{name} (pid {popen.pid})",
                    f"exited with code {popen.returncode} while starting (its error is printed above)",
                )
            if time.monotonic() > deadline:
                cls(popen, 0, scratch).kill()
                raise RolloutWorkerTimeout(f"{name} (pid {popen.pid})", f"did not start within {timeout_s:g}s")
            time.sleep(0.05)
        return cls(popen, int(port_file.read_text()), scratch)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """None while the process runs."""
        return self.popen.poll()

    def wait(self, timeout_s: float) -> bool:
        """True if the process ended within `timeout_s`."""
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILLs the worker's process group and reaps the worker.

        Also when the worker itself is gone: what it started (vLLM's engine processes) lives on in its group.
        The kernel keeps the group's id from being reused while any member lives.
        """
        with contextlib.suppress(ProcessLookupError):  # no member left
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _worker_env(authkey: bytes, visible_devices: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env[AUTHKEY_ENV] = authkey.decode()
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    return env
