"""What the policy is shown: chat template or plain text, and an optional system prompt.

Conversational prompts (lists of messages) always go through the tokenizer's
chat template (grpo/data.py `encode_prompt`). Plain-text prompts follow
`--use_chat_template`:

    auto     wrapped as one user message when the model's tokenizer has a chat template
             (an instruct model), else given as they are (a base model, the embedded default)
    always   wrapped; a tokenizer without a chat template is an error
    never    given as they are (TRL's behaviour for plain prompts)

A wrapped prompt's completion, if the rows have one (for SFT), becomes the
assistant message. `--system_prompt` adds a system message to conversational
prompts that have none, or a first paragraph to plain ones; `r1` is
DeepSeek-R1's reasoning instruction.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from r1kit.grpo.options import ConfigError
from r1kit.rewards.protocol import is_conversational

CHAT_TEMPLATE_MODES = ("auto", "always", "never")
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
SYSTEM_PROMPTS = {"r1": R1_SYSTEM_PROMPT}


def resolve_system_prompt(system_prompt: str | None) -> str | None:
    """The text of `--system_prompt`: a built-in's name (SYSTEM_PROMPTS) or the text itself."""
    return SYSTEM_PROMPTS.get(system_prompt, system_prompt) if system_prompt else None


def format_prompts(dataset: Dataset, mode: str, system_prompt: str | None, has_chat_template: bool) -> Dataset:
    """`dataset` with its prompts (and completions) as the policy will see them (see the module docstring)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"--use_chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    conversational = is_conversational(dataset[0]["prompt"])
    if (conversational or mode == "always") and not has_chat_template:
        reason = "the prompts are conversational" if conversational else "--use_chat_template always"
        raise ConfigError(f"{reason}, but the model's tokenizer has no chat template")
    wrap = not conversational and (mode == "always" or (mode == "auto" and has_chat_template))
    system = resolve_system_prompt(system_prompt)
    if not (wrap or system):
        return dataset

    def format_row(row: dict[str, Any]) -> dict[str, Any]:
        prompt, formatted = row["prompt"], {}
        if wrap:
            prompt = [{"role": "user", "content": prompt}]
            if "completion" in row:
                formatted["completion"] = [{"role": "assistant", "content": row["completion"]}]
        if system and is_conversational(prompt):
            prompt = prompt if prompt[0]["role"] == "system" else [{"role": "system", "content": system}, *prompt]
        elif system:
            prompt = f"{system}\n\n{prompt}"
        return {**formatted, "prompt": prompt}

    return dataset.map(format_row)
