"""Run untrusted Python code against test cases in a sandboxed subprocess.

What the sandbox guarantees (each layer holds without the others):

- Time: the whole process group is SIGKILLed at the wall-clock limit
  (`timeout_s` + a short grace); the process also ends itself at `timeout_s`
  from a watchdog thread, RLIMIT_CPU stops busy loops, and each test has its own
  alarm (`test_timeout_s`).
- Memory and output: RLIMIT_AS caps the address space; stdout/stderr go to
  files capped by RLIMIT_FSIZE and are read back at most `max_output_bytes`;
  RLIMIT_NOFILE caps open files; no core dumps.
- Processes: an audit hook refuses fork, exec, spawn, subprocess, os.system,
  ctypes and signals to other processes, and RLIMIT_NPROC is set (the kernel
  enforces it for non-root users). Where `unshare` works the code runs in its own
  PID namespace, so anything it started dies with it.
- Network: a fresh network namespace (`unshare --net`: no interfaces) where
  permitted, and the audit hook refuses socket creation, connect, bind and DNS
  lookups everywhere.
- Files: the code runs in a private temporary directory that is deleted
  afterwards; the audit hook refuses opening for writing, creating, renaming,
  deleting and chmod/chown outside it. Reading files is allowed.

What it does not guarantee: it is not a security boundary against a determined
attacker. Audit hooks live in the same interpreter as the code and can in
principle be bypassed by code that corrupts the interpreter; a kernel exploit
escapes all of it; as root, RLIMIT_NPROC is not enforced by Linux; the code can
read any file the trainer's user can read; and the pass/fail line is protected
only by a random nonce the code could find by introspecting the harness. Run
untrusted code at scale inside a container or VM (gVisor, Firecracker) as well.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).with_name("sandbox_harness.py")
_UNSHARE_CANDIDATES = (
    ["unshare", "--net", "--pid", "--fork", "--kill-child"],
    ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"],
    ["unshare", "--net"],
    ["unshare", "--user", "--map-root-user", "--net"],
)
_GRACE_S = 1.0


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run (all tests of one completion).

    timeout_s: wall-clock limit of the whole run, in seconds.
    test_timeout_s: wall-clock limit of one test, in seconds.
    cpu_s: CPU-time limit (RLIMIT_CPU), whole seconds.
    memory_mb: address-space limit (RLIMIT_AS), MiB.
    max_output_bytes: stdout/stderr bytes kept, and a solution's captured stdout per test.
    max_file_bytes: largest file the code may write (RLIMIT_FSIZE), bytes.
    max_open_files: RLIMIT_NOFILE.
    max_processes: RLIMIT_NPROC (enforced by Linux for non-root users only).
    """

    timeout_s: float = 6.0
    test_timeout_s: float = 2.0
    cpu_s: int = 6
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 64
    max_processes: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < (0 if name == "max_processes" else 1e-3):
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")
        if self.memory_mb < 128:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 128 (the interpreter needs it), got {self.memory_mb}")


@dataclass(frozen=True)
class SandboxReport:
    """Outcome of one sandboxed run: per-test pass flags (all False if the run died), and why."""

    passed: list[bool]
    timed_out: bool
    exit_code: int
    stdout: str
    stderr: str
    isolation: str

    @property
    def fraction_passed(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def _probe(prefix: list[str]) -> bool:
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The strongest `unshare` command line that works here (network + PID namespaces), or () if none."""
    if shutil.which("unshare") is None:
        return ()
    return next((tuple(prefix) for prefix in _UNSHARE_CANDIDATES if _probe(prefix)), ())


def _read_tail(path: Path, cap: int) -> str:
    """The last `cap` bytes of a log file (the result line is written last)."""
    with open(path, "rb") as stream:
        stream.seek(max(0, path.stat().st_size - cap))
        return stream.read(cap).decode("utf-8", errors="replace")


def _parse_passed(stdout: str, nonce: str, num_tests: int) -> list[bool] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            try:
                passed = json.loads(line[len(nonce) :])
            except ValueError:
                return None
            if isinstance(passed, list) and len(passed) == num_tests:
                return [item is True for item in passed]
    return None


def run_python_tests(code: str, tests: list[Any], limits: SandboxLimits | None = None) -> SandboxReport:
    """Run `code` against `tests` (assert snippets or {"input", "output"} dicts) in the sandbox."""
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="r1kit-sandbox-")).resolve()
    logs = Path(tempfile.mkdtemp(prefix="r1kit-sandbox-logs-"))
    prefix = namespace_prefix()
    job = {"code": code, "tests": tests, "nonce": nonce, "limits": asdict(limits), "workdir": str(workdir)}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
    try:
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            process = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-X", "utf8", str(HARNESS)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env, start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                process.communicate(json.dumps(job).encode(), timeout=limits.timeout_s + _GRACE_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)
        stdout = _read_tail(logs / "stdout", limits.max_output_bytes)
        stderr = _read_tail(logs / "stderr", limits.max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    passed = _parse_passed(stdout, nonce, len(tests))
    timed_out = timed_out or process.returncode == 124
    return SandboxReport(
        passed=passed or [False] * len(tests),
        timed_out=timed_out,
        exit_code=process.returncode,
        stdout=stdout,
        stderr=stderr,
        isolation=" ".join(prefix[1:]) or "none",
    )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's process group (the code and anything it managed to start) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
