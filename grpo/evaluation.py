"""Held-out accuracy of a policy under fixed sampling settings.

The scorer is called as the training step calls the reward suite (see
`collector`): the prompts as the dataset holds them, the decoded completions
(a RewardSuite passes them to its functions as assistant messages when the
prompts are conversational, as TRL does), `completion_ids`, and the dataset's
columns but the prompt, "completion" and "completion_ids".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from r1kit.grpo.collector import repeat_each, reward_columns
from r1kit.grpo.data import encode_prompt
from r1kit.rollout.engine import RolloutEngine, SamplingParams

# scorer(prompts, completions, columns) -> one score in [0, 1] (or None) per completion
Scorer = Callable[[list[Any], list[str], dict[str, list]], Sequence[float | None]]


@dataclass(frozen=True)
class EvalResult:
    """accuracy: mean score over all sampled completions (pass@1 estimated from n samples per prompt);
    unscored: completions the scorer returned None for (left out of the mean)."""

    accuracy: float
    mean_completion_length: float
    num_prompts: int
    samples_per_prompt: int
    unscored: int

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}completion_length": self.mean_completion_length}


def evaluate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    scorer: Scorer,
    params: SamplingParams,
    prompt_column: str = "prompt",
) -> EvalResult:
    """Sample `params.n` completions for every row of `dataset` and score them."""
    prompts = list(dataset[prompt_column])
    batch = engine.generate([encode_prompt(tokenizer, p) for p in prompts], params)
    columns = {c: repeat_each(dataset[c], params.n) for c in reward_columns(dataset.column_names, prompt_column)}
    columns["completion_ids"] = batch.completion_ids
    scores = list(scorer(repeat_each(prompts, params.n), batch.completion_text, columns))
    scored = [s for s in scores if s is not None and not math.isnan(s)]
    return EvalResult(
        accuracy=sum(scored) / len(scored) if scored else math.nan,
        mean_completion_length=batch.num_generated_tokens / len(batch),
        num_prompts=len(prompts),
        samples_per_prompt=params.n,
        unscored=len(scores) - len(scored),
    )
