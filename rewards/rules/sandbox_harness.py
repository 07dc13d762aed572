"""Runs untrusted Python against test cases inside the sandbox process (see `sandbox.py`).

Started as `python -I sandbox_harness.py` in a fresh temporary directory; reads
one JSON job on stdin:

    {"code": str, "tests": [str | {"input": str, "output": str}], "nonce": str,
     "limits": {...}, "workdir": str}

and, before any untrusted code runs, (1) starts a watchdog thread that ends the
process at the wall-clock limit, (2) sets resource limits (CPU seconds, address
space, file size, open files, processes, no core dumps), and (3) installs an
audit hook that refuses sockets, process creation, signals to other processes,
ctypes, raising resource limits, and any write, rename or delete outside the
working directory. Audit hooks cannot be removed once installed.

A string test is Python run after the solution in the solution's namespace (an
`assert ...` passes when it raises nothing). A dict test runs the solution as a
program with `input` on stdin and passes when its stdout equals `output`
(trailing whitespace ignored). Each test has its own time limit. The result is
one line on the original stdout: the nonce, then a JSON list of booleans.

Standard library only: this file runs with `-I`, outside the r1kit package.
"""

import io
import json
import os
import resource
import signal
import sys
import threading
import time

_PROCESS_EVENTS = {
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "sys.remote_exec", "os.unshare", "os.setns",
}  # fmt: skip
_NETWORK_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}
_PATH_EVENTS = {
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
    "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
    "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move",
    "shutil.rmtree", "shutil.chown", "shutil.make_archive", "shutil.unpack_archive",
}  # fmt: skip
_BLOCKED_IMPORTS = {"_ctypes", "ctypes", "_posixsubprocess"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class TestTimeout(BaseException):
    """Raised by the per-test alarm (a BaseException, so `except Exception` in a solution cannot eat it)."""


def _inside(workdir, path):
    if isinstance(path, int):
        return True  # an already-open descriptor: nothing new is reached
    path = os.fsdecode(os.fspath(path))
    resolved = os.path.realpath(os.path.join(os.getcwd(), path))
    return resolved == workdir or resolved.startswith(workdir + os.sep)


def _is_write(mode, flags):
    if isinstance(mode, str) and any(char in mode for char in "wax+"):
        return True
    return isinstance(flags, int) and flags != -1 and bool(flags & _WRITE_FLAGS)


def make_audit_hook(workdir):
    """The hook that enforces the sandbox's policy inside the interpreter."""

    def hook(event, args):
        if event in _PROCESS_EVENTS or event in _NETWORK_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in _BLOCKED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and _is_write(args[1], args[2]) and not _inside(workdir, args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        if event in _PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(workdir, arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the working directory")

    return hook


def _set_limits(limits):
    def cap(which, value):
        resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_CPU, limits["cpu_s"])
    cap(resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024)
    cap(resource.RLIMIT_FSIZE, limits["max_file_bytes"])
    cap(resource.RLIMIT_NOFILE, limits["max_open_files"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NPROC, limits["max_processes"])


def _watchdog(seconds):
    def expire():
        time.sleep(seconds)
        os._exit(124)

    threading.Thread(target=expire, daemon=True).start()


class _CappedText(io.StringIO):
    """stdout for the solution: keeps at most `cap` characters and drops the rest."""

    def __init__(self, cap):
        super().__init__()
        self._room = cap

    def write(self, text):
        kept = text[: max(self._room, 0)]
        self._room -= len(kept)
        super().write(kept)
        return len(text)


def _on_alarm(signum, frame):
    raise TestTimeout()


def _run(compiled, namespace, stdin_text, limits):
    """Exec `compiled` in `namespace` with the given stdin, under the per-test alarm; returns stdout text."""
    sys.stdin = io.StringIO(stdin_text)
    sys.stdout = _CappedText(limits["max_output_bytes"])
    signal.setitimer(signal.ITIMER_REAL, limits["test_timeout_s"])
    try:
        exec(compiled, namespace)
    except SystemExit as exit_request:
        if exit_request.code not in (None, 0):
            raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        output, sys.stdout = sys.stdout.getvalue(), sys.__stdout__
    return output


def _same_output(actual, expected):
    def lines(text):
        return [line.rstrip() for line in str(text).rstrip().splitlines()]

    return lines(actual) == lines(expected)


def _passes(compiled, test, limits):
    try:
        if isinstance(test, dict):
            output = _run(compiled, {"__name__": "__main__"}, str(test.get("input", "")), limits)
            return _same_output(output, test.get("output", ""))
        namespace = {"__name__": "__solution__"}
        _run(compiled, namespace, "", limits)
        _run(compile(test, "<test>", "exec"), namespace, "", limits)
        return True
    except (Exception, TestTimeout, SystemExit):
        return False


def main():
    job = json.loads(sys.stdin.read())
    result_fd = os.dup(1)
    limits, workdir = job["limits"], os.path.realpath(job["workdir"])
    os.chdir(workdir)
    _watchdog(limits["timeout_s"])
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        compiled = compile(job["code"], "<solution>", "exec")
    except (SyntaxError, ValueError):
        compiled = None
    _set_limits(limits)
    sys.addaudithook(make_audit_hook(workdir))
    passed = [compiled is not None and _passes(compiled, test, limits) for test in job["tests"]]
    os.write(result_fd, (job["nonce"] + json.dumps(passed) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
