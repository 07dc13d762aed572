"""Reward-model reward: a transformers sequence-classification model scores each (prompt, completion).

    r_i = RM(prompt_i ⊕ completion_i)[0]          (the first logit; sigmoid of it with `sigmoid=True`)

Any `AutoModelForSequenceClassification` checkpoint works (num_labels = 1 is the
usual reward-model head; with more labels the first logit is used). The text is
the tokenizer's chat template applied to a user/assistant exchange when
`use_chat_template` is set and the tokenizer has one, else the prompt and the
completion concatenated. Completions are scored in batches of `batch_size`,
padded on the right, truncated to `max_length` tokens from the left so the end
of a long completion (where the answer is) is kept.

Scores are raw logits, not in [0, 1], unless `sigmoid=True`. The reward is
`batched`: the suite calls it once per step with the whole batch, in the
calling process; wrap it in `rewards.IsolatedReward` to give it its own process.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from r1kit.rewards.protocol import completion_text


class RewardModelReward:
    """Scores completions with a sequence-classification reward model (see the module docstring)."""

    batched = True
    __name__ = "reward_model"

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: Any = None,
        *,
        batch_size: int = 8,
        max_length: int = 2048,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        use_chat_template: bool = True,
        sigmoid: bool = False,
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise ValueError(
                f"RewardModelReward needs batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}"
            )
        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype)
        elif tokenizer is None:
            raise ValueError("RewardModelReward needs a tokenizer when given a model object")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("RewardModelReward: the tokenizer has neither a pad token nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.sigmoid = sigmoid

    def format(self, prompt: str, completion: str) -> str:
        """The text the reward model reads for one exchange."""
        if not self.use_chat_template:
            return prompt + completion
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        """First-logit score of each text, in batches; returns len(texts) floats."""
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenize(texts[start : start + self.batch_size])
            logits = self.model(**batch).logits  # (b, num_labels)
            values = logits[:, 0].float()
            scores.extend((values.sigmoid() if self.sigmoid else values).tolist())
        return scores

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        finally:
            self.tokenizer.truncation_side = side
        return {key: value.to(self.device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}

    def __call__(self, completions: list[Any], *, prompts: list[Any], **columns: Any) -> list[float | None]:
        texts = [self.format(completion_text(p), completion_text(c)) for p, c in zip(prompts, completions, strict=True)]
        return list(self.score_texts(texts))
