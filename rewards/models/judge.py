"""Generative judge: an LLM compares each completion with the reference answer and gives a verdict.

    r_i = 1.0 if the judge's verdict on (question_i, reference_i, completion_i) is CORRECT
          0.0 if it is INCORRECT
          None if the reply has no verdict (logged; left out of the mean)

The judge prompt (`JUDGE_TEMPLATE`, replaceable) shows the question, the
reference answer and the end of the response (`max_response_chars`), and asks
for a last line "Verdict: CORRECT" or "Verdict: INCORRECT". `parse_verdict`
takes the last such line, else the last standalone CORRECT/INCORRECT word.
The text comes from any `TextGenerator`: the rollout engine through
`EngineGenerator`, or an OpenAI-compatible server through `OpenAIGenerator`.
The reference is read from `answer_column`; a GSM8K solution is cut to its
"#### N" answer. The judge is `batched`: one generate call per step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from r1kit.rewards.models.generators import TextGenerator
from r1kit.rewards.protocol import completion_text

logger = logging.getLogger(__name__)

JUDGE_TEMPLATE = """You are grading a response to a question against the reference answer.
Decide whether the response's final answer is equivalent to the reference answer. Ignore style and
the reasoning; judge only the final answer.

Question:
{question}

Reference answer:
{reference}

Response:
{response}

Reply with one line of explanation, then a last line that is exactly "Verdict: CORRECT" or
"Verdict: INCORRECT"."""

_VERDICT_RE = re.compile(r"verdict\s*[:：]?\s*\**\s*(correct|incorrect)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"\b(correct|incorrect)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> float | None:
    """1.0 for CORRECT, 0.0 for INCORRECT, None when the reply has no verdict.

    >>> parse_verdict("The totals agree.\\nVerdict: CORRECT"), parse_verdict("Verdict: incorrect")
    (1.0, 0.0)
    >>> parse_verdict("I am not sure.") is None
    True
    """
    matches = _VERDICT_RE.findall(reply) or _WORD_RE.findall(reply)
    if not matches:
        return None
    return 1.0 if matches[-1].lower() == "correct" else 0.0


def _reference_text(reference: Any) -> str:
    text = str(reference)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


@dataclass
class GenerativeJudge:
    """LLM-as-judge reward against the reference in `answer_column` (see the module docstring)."""

    generator: TextGenerator
    answer_column: str = "answer"
    template: str = JUDGE_TEMPLATE
    max_response_chars: int = 4000
    batched = True
    __name__ = "judge"

    def __post_init__(self) -> None:
        for field_name in ("{question}", "{reference}", "{response}"):
            if field_name not in self.template:
                raise ValueError(f"GenerativeJudge.template must contain {field_name}")
        if not isinstance(self.generator, TextGenerator):
            raise TypeError(f"GenerativeJudge.generator must have generate(prompts) -> texts, got {self.generator!r}")

    def judge_prompt(self, question: str, reference: Any, response: str) -> str:
        """The prompt the judge model sees for one completion."""
        return self.template.format(
            question=question,
            reference=_reference_text(reference),
            response=response[-self.max_response_chars :],
        )

    def __call__(self, completions: list[Any], *, prompts: list[Any], **columns: Any) -> list[float | None]:
        if self.answer_column not in columns:
            raise KeyError(f"judge needs the reference-answer column {self.answer_column!r}")
        judge_prompts = [
            self.judge_prompt(completion_text(prompt), reference, completion_text(completion))
            for prompt, reference, completion in zip(prompts, columns[self.answer_column], completions, strict=True)
        ]
        replies = self.generator.generate(judge_prompts)
        if len(replies) != len(judge_prompts):
            raise RuntimeError(f"judge generator returned {len(replies)} replies for {len(judge_prompts)} prompts")
        verdicts = [parse_verdict(reply) for reply in replies]
        for index, (reply, verdict) in enumerate(zip(replies, verdicts, strict=True)):
            if verdict is None:
                logger.warning("judge gave no verdict for completion %d: %r", index, reply[-200:])
        return verdicts
