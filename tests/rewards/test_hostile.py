"""Hostile completions through a training-style suite: each is scored within its limit; the run goes on."""

import time

from r1kit.rewards import CodeExecution, RewardSuite, RewardSuiteConfig
from r1kit.rewards.rules.sandbox import SandboxLimits

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
GOOD_CODE = "```python\ndef add(a, b):\n    return a + b\n```"


def code(body: str) -> str:
    return f"```python\n{body}\ndef add(a, b):\n    return a + b\n```"


HOSTILE_MATH = [
    r"The answer is \boxed{2^{33220}}",  # 10,000 digits
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{" + r"\frac{1}{" * 30 + "2" + "}" * 30 + "}",  # deeply nested LaTeX
    "The answer is " + "1" * 10_000,
]
HOSTILE_CODE = [
    code("while True:\n    pass"),
    code("import os\nwhile True:\n    os.fork()"),
    code("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"),
    code("open('/tmp/r1kit-hostile-escape', 'w').write('x')"),
    code("import time\ntime.sleep(3600)"),
]


def test_hostile_batch_is_scored_within_the_limits_and_the_run_goes_on():
    code_reward = CodeExecution(limits=SandboxLimits(timeout_s=2.0, test_timeout_s=0.5, cpu_s=2))
    config = RewardSuiteConfig(timeout_s=5.0, num_workers=2, on_error="zero")
    completions = [*HOSTILE_MATH, *HOSTILE_CODE, r"\boxed{3}", GOOD_CODE]
    n = len(completions)
    columns = {"answer": ["3"] * n, "tests": [ADD_TESTS] * n}
    with RewardSuite(["math_accuracy", code_reward], config=config) as suite:
        start = time.monotonic()
        result = suite.score(["Add the numbers."] * n, completions, columns)
        elapsed = time.monotonic() - start
        math_scores = result.scores["math_accuracy"].tolist()
        code_scores = result.scores["code_execution"].tolist()
        assert math_scores[: len(HOSTILE_MATH)] == [0.0] * len(HOSTILE_MATH)
        assert code_scores[len(HOSTILE_MATH) : -2] == [0.0] * len(HOSTILE_CODE)
        assert math_scores[-2] == 1.0 and code_scores[-1] == 1.0
        assert not result.failures  # the guards answered; no reward needed to be killed
        assert elapsed < 15.0
        follow_up = suite.score(["q"], [r"\boxed{3}"], {"answer": ["3"], "tests": [ADD_TESTS]})
        assert follow_up.scores["math_accuracy"].tolist() == [1.0]
