"""Rule-based rewards, registered by name on import: math_accuracy, format, length_penalty,
language_consistency, code_execution. Each is a frozen dataclass instance whose
class can be built with other settings (another answer column, other tags, ...),
and each is element-wise (`elementwise = True`): it scores a completion from its
own text, prompt and columns alone, so the suite may score it one completion per
task, each under its own hard time limit."""

from r1kit.rewards.rules.code import CodeExecution, code_execution
from r1kit.rewards.rules.format import FormatReward, format_reward
from r1kit.rewards.rules.language import LanguageConsistency, language_consistency
from r1kit.rewards.rules.length import OverlongPenalty, length_penalty
from r1kit.rewards.rules.math_accuracy import MathAccuracy, math_accuracy
from r1kit.rewards.rules.sandbox import SandboxLimits, SandboxReport, run_python_tests

__all__ = [
    "CodeExecution",
    "FormatReward",
    "LanguageConsistency",
    "MathAccuracy",
    "OverlongPenalty",
    "SandboxLimits",
    "SandboxReport",
    "code_execution",
    "format_reward",
    "language_consistency",
    "length_penalty",
    "math_accuracy",
    "run_python_tests",
]
