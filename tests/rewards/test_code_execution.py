"""Code execution reward: code extraction, test formats, and the fraction of tests passed."""

import json

import pytest

from r1kit.rewards import CodeExecution, code_execution
from r1kit.rewards.rules.code import extract_code, normalize_tests
from r1kit.rewards.rules.sandbox import SandboxLimits

SOLUTION = "Here is my solution:\n```python\ndef square(x):\n    return x * x\n```\nDone."
TESTS = ["assert square(2) == 4", "assert square(3) == 9", "assert square(-1) == -1"]


def test_fraction_of_tests_passed():
    scores = code_execution([SOLUTION, "I cannot solve this.", SOLUTION], tests=[TESTS, TESTS, []])
    assert scores[0] == pytest.approx(2 / 3)
    assert scores[1:] == [0.0, None]


def test_stdin_stdout_tests_and_json_columns():
    program = "```py\nn = int(input())\nprint(n * n)\n```"
    apps_style = json.dumps({"inputs": ["3\n", "4\n"], "outputs": ["9\n", "15\n"]})
    assert code_execution([program], tests=[apps_style]) == [0.5]


def test_configured_column_and_bare_code():
    limits = SandboxLimits(timeout_s=3)
    reward = CodeExecution(tests_column="test_list", require_code_block=False, limits=limits)
    assert reward(["def square(x):\n    return x * x\n"], test_list=[TESTS[:2]]) == [1.0]
    with pytest.raises(KeyError, match="test_list"):
        reward(["x"], tests=[TESTS])


def test_extraction_and_test_validation():
    assert extract_code("```python\na = 1\n```\ntext\n```\nb = 2\n```") == "b = 2\n"
    assert extract_code("no code") is None
    assert normalize_tests('["assert True"]') == ["assert True"]
    with pytest.raises(ValueError, match="not JSON"):
        normalize_tests("assert True")
    with pytest.raises(ValueError, match="input/output dict"):
        normalize_tests([{"stdin": "1"}])
