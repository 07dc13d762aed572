"""Code execution reward: the fraction of test cases a completion's code passes in the sandbox.

    r_i = (# tests passed by the last code block of completion_i) / (# tests of row i)

The code is the last fenced block (```python, ```py or a bare ```) of the
completion, or the whole completion when `require_code_block=False`. Tests come
from the `tests_column` column, one list per row, in either form:

- strings of Python run after the solution in its namespace
  (`"assert add(2, 3) == 5"`), as in MBPP and HumanEval;
- {"input": stdin, "output": expected stdout} dicts, as in APPS and
  CodeContests (an APPS-style {"inputs": [...], "outputs": [...]} is accepted too).

A JSON string holding either form is decoded first. The score is None when the
row has no tests and 0.0 when the completion has no code. Each completion runs
in its own sandboxed process (`sandbox.py`: time, memory, process, network and
file-system limits); completions of one call run in parallel threads.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from r1kit.rewards.protocol import completion_text
from r1kit.rewards.registry import register
from r1kit.rewards.rules.sandbox import SandboxLimits, run_python_tests

_CODE_BLOCK_RE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last fenced code block of `text`, or None.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```")
    'print(1)\\n'
    """
    blocks = _CODE_BLOCK_RE.findall(text)
    return blocks[-1] if blocks else None


def normalize_tests(tests: Any) -> list[str | dict[str, str]]:
    """Test cases as a list of assert snippets or {"input", "output"} dicts (see the module docstring)."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as error:
            raise ValueError(f"code_execution: tests are a string but not JSON: {tests[:80]!r}") from error
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list):
        raise ValueError(f"code_execution: tests must be a list, got {type(tests).__name__}")
    for test in tests:
        if not (isinstance(test, str) or (isinstance(test, dict) and "input" in test and "output" in test)):
            raise ValueError(f"code_execution: a test must be a string or an input/output dict, got {test!r}")
    return tests


@dataclass(frozen=True)
class CodeExecution:
    """Fraction of the row's tests the completion's code passes, in [0, 1]; None without tests."""

    tests_column: str = "tests"
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    require_code_block: bool = True
    max_parallel: int = 4
    __name__ = "code_execution"
    elementwise = True  # scores each completion on its own: the suite may run one per task

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"CodeExecution.max_parallel must be >= 1, got {self.max_parallel}")

    def score_one(self, completion: str, tests: Any) -> float | None:
        """Score one completion against its row's tests."""
        tests = [] if tests is None else normalize_tests(tests)
        if not tests:
            return None
        code = extract_code(completion)
        if code is None and not self.require_code_block:
            code = completion
        if code is None:
            return 0.0
        return run_python_tests(code, tests, self.limits).fraction_passed

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        if self.tests_column not in columns:
            raise KeyError(f"code_execution needs the test-case column {self.tests_column!r}")
        texts = [completion_text(c) for c in completions]
        rows = list(zip(texts, columns[self.tests_column], strict=True))
        if len(rows) == 1:
            return [self.score_one(*rows[0])]
        with ThreadPoolExecutor(min(self.max_parallel, len(rows))) as pool:
            return list(pool.map(lambda row: self.score_one(*row), rows))


code_execution = register("code_execution")(CodeExecution())
