"""Format reward: 1.0 when a completion is exactly "<think>reasoning</think> <answer>answer</answer>".

    r_i = 1 if completion_i = ws? open_think R close_think ws? open_answer A close_answer ws?
          with R and A non-blank and each tag used exactly once, else 0

This is the format reward of DeepSeek-R1 (reasoning in think tags, then the
answer). The tags are configurable; `answer_tags=None` asks only for the think
block followed by a non-blank answer, and `think_opened_in_prompt=True` is for
templates whose prompt already ends with the opening think tag. Checking is
plain string search, linear in the completion's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1kit.rewards.protocol import completion_text
from r1kit.rewards.registry import register


def _tags_ok(tags: tuple[str, str] | None, field: str) -> None:
    if tags is None:
        return
    if len(tags) != 2 or not all(isinstance(tag, str) and tag.strip() for tag in tags) or tags[0] == tags[1]:
        raise ValueError(f"FormatReward.{field} must be two different non-blank tags, got {tags!r}")


@dataclass(frozen=True)
class FormatReward:
    """Scores 1.0 for the R1 reasoning/answer layout and 0.0 otherwise (tags configurable).

    >>> FormatReward()(["<think> 12 + 7 = 19 </think> <answer> 19 </answer>", "<answer> 19 </answer>"])
    [1.0, 0.0]
    """

    think_tags: tuple[str, str] = ("<think>", "</think>")
    answer_tags: tuple[str, str] | None = ("<answer>", "</answer>")
    think_opened_in_prompt: bool = False
    __name__ = "format"
    elementwise = True  # scores each completion on its own: the suite may run one per task

    def __post_init__(self) -> None:
        _tags_ok(self.think_tags, "think_tags")
        _tags_ok(self.answer_tags, "answer_tags")

    def matches(self, text: str) -> bool:
        """Whether `text` has the think block, then the answer, and nothing else."""
        think_open, think_close = self.think_tags
        text = text.strip()
        if not self.think_opened_in_prompt:
            if not text.startswith(think_open):
                return False
            text = text[len(think_open) :]
        reasoning, closed, rest = text.partition(think_close)
        if not closed or not reasoning.strip() or think_open in reasoning or think_open in rest:
            return False
        if think_close in rest:
            return False
        if self.answer_tags is None:
            return bool(rest.strip())
        answer_open, answer_close = self.answer_tags
        rest = rest.strip()
        if not (rest.startswith(answer_open) and rest.endswith(answer_close)):
            return False
        answer = rest[len(answer_open) : len(rest) - len(answer_close)]
        return bool(answer.strip()) and answer_open not in answer and answer_close not in answer

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        return [float(self.matches(completion_text(c))) for c in completions]


format_reward = register("format")(FormatReward())
