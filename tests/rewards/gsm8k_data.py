"""GSM8K's labelled model solutions (OpenAI's grade-school-math release), read from the shared data folder.

Each of the 1,319 test problems has four model solutions ending in "A: N" with a
correctness label; the reference is the test split's worked solution ending in
"#### N".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
_ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = (_ROOT / "shared" / "data" / "gsm8k", _ROOT.parent / "shared" / "data" / "gsm8k")


@dataclass(frozen=True)
class LabelledSolution:
    question: str
    reference: str  # the test split's worked solution, ending in "#### N"
    solution: str
    is_correct: bool


def gsm8k_dir() -> Path | None:
    return next((path for path in CANDIDATES if (path / "example_model_solutions.jsonl").exists()), None)


def labelled_solutions(directory: Path) -> list[LabelledSolution]:
    with open(directory / "test.jsonl") as test_file:
        references = {row["question"]: row["answer"] for row in map(json.loads, test_file)}
    solutions = []
    with open(directory / "example_model_solutions.jsonl") as solutions_file:
        for row in map(json.loads, solutions_file):
            for model in MODELS:
                entry = row[model]
                solutions.append(
                    LabelledSolution(
                        row["question"], references[row["question"]], entry["solution"], entry["is_correct"]
                    )
                )
    return solutions


_FINAL_LINE_RE = re.compile(r"\nA: (?P<answer>-?[\d,]*\.?\d+)\s*$")


def rewrite_final_answer(solution: str, style: str) -> str | None:
    """The solution with its final "A: N" line re-written in `style`; None if it has no such line."""
    match = _FINAL_LINE_RE.search(solution)
    if match is None:
        return None
    answer = match.group("answer").replace(",", "")
    if style == "thousands" and "." not in answer and len(answer.lstrip("-")) > 3:
        answer = f"{int(answer):,}"
    line = {
        "boxed": f"\\boxed{{{answer}}}",
        "the_answer_is": f"The answer is ${answer}.",
        "bold": f"**{answer}**",
        "dollars": f"{answer} dollars",
        "thousands": f"A: {answer}",
        "latex_fraction": f"\\boxed{{\\frac{{{answer}}}{{1}}}}",
    }[style]
    return solution[: match.start()] + "\n" + line
