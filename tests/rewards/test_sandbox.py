"""The code sandbox: correct verdicts, and hostile code that must not hang, escape, or reach the network."""

import socket
import time
import uuid
from pathlib import Path

import pytest

from r1kit.rewards.rules import sandbox
from r1kit.rewards.rules.sandbox import SandboxLimits, namespace_prefix, run_python_tests

LIMITS = SandboxLimits(timeout_s=2.0, test_timeout_s=0.5, cpu_s=2)
ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(params=["namespaces", "audit-hook-only"])
def isolation(request, monkeypatch):
    """Run each hostile test with the network/PID namespaces and again with only the in-interpreter guard."""
    if request.param == "namespaces" and not namespace_prefix():
        pytest.skip("unshare is not permitted here")
    if request.param == "audit-hook-only":
        monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    return request.param


def test_assert_and_io_tests():
    report = run_python_tests(ADD, ["assert add(2, 3) == 5", "assert add(1, 1) == 3"], LIMITS)
    assert report.passed == [True, False] and report.fraction_passed == 0.5
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "1 1", "output": "3"}]
    assert run_python_tests(program, tests, LIMITS).passed == [True, False]


def test_syntax_error_and_exit_codes():
    assert run_python_tests("def broken(:", ["assert True"], LIMITS).passed == [False]
    exits = "import sys\nprint(7)\nsys.exit(0)\n"
    assert run_python_tests(exits, [{"input": "", "output": "7"}], LIMITS).passed == [True]
    fails = "import sys\nsys.exit(1)"
    assert run_python_tests(fails, [{"input": "", "output": ""}], LIMITS).passed == [False]


def test_files_inside_the_private_directory_work():
    code = "open('scratch.txt', 'w').write('x')\nimport os\nos.mkdir('sub')\n"
    assert run_python_tests(code, ["assert open('scratch.txt').read() == 'x'"], LIMITS).passed == [True]


def test_one_slow_test_does_not_sink_the_others():
    code = ADD + "def slow():\n    while True:\n        pass\n"
    report = run_python_tests(code, ["slow()", "assert add(1, 2) == 3"], LIMITS)
    assert report.passed == [False, True]


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleep forever, alarm ignored": (
        "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)\n"
    ),
    "loop that swallows every exception": (
        "while True:\n    try:\n        while True: pass\n    except BaseException: pass\n"
    ),
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "multiprocessing bomb": (
        "import multiprocessing as mp\nfor _ in range(64):\n    mp.Process(target=print).start()\n"
    ),
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n",
    "ctypes fork": "import ctypes\nctypes.CDLL(None).fork()\n",
    "memory bomb": "x = bytearray(8 * 1024 ** 3)\n",
    "10,000-digit power tower": "x = 9 ** 9 ** 9\n",
    "output flood": "import sys\nwhile True:\n    sys.__stdout__.write('x' * 65536)\n",
    "kill the parent": "import os\nos.kill(os.getppid(), 9)\n",
    "raise own limits": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_scores_zero_within_the_limit(name, isolation):
    start = time.monotonic()
    report = run_python_tests(HOSTILE[name] + ADD, ["assert add(1, 2) == 3"], LIMITS)
    elapsed = time.monotonic() - start
    assert report.passed == [False], (name, report)
    assert elapsed < LIMITS.timeout_s + 2.0, (name, elapsed)


def test_no_writes_outside_the_directory(isolation, tmp_path):
    target = Path("/tmp") / f"r1kit-escape-{uuid.uuid4().hex}"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nos.chdir('/tmp')\nopen({target.name!r}, 'w').write('x')",
    ]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    attempts += [f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]
    for code in attempts:
        assert run_python_tests(code, ["assert True"], LIMITS).passed == [False], code
    assert not target.exists()
    assert victim.read_text() == "keep"


def test_no_network(isolation):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
        assert run_python_tests(code, ["assert True"], LIMITS).passed == [False]
        dns = "import socket\nsocket.getaddrinfo('localhost', 80)\n"
        assert run_python_tests(dns, ["assert True"], LIMITS).passed == [False]
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection ever reached the listener
            server.accept()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=16)
