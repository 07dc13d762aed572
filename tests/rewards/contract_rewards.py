"""Reward functions written against TRL's contract that report what they were given; workers import them as
"tests.rewards.contract_rewards:NAME"."""

from __future__ import annotations


def _content(completion) -> str:
    """A completion's text, read the way TRL's own rewards read it (`completion[0]["content"]`) when it is messages."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def sees_trl_completions(completions, prompts, **kwargs) -> list[float]:
    """1.0 per completion passed as TRL passes it: one assistant message after a conversational prompt, a string
    after a string prompt; else 0.0."""
    scores = []
    for completion, prompt in zip(completions, prompts, strict=True):
        if isinstance(prompt, str):
            scores.append(float(isinstance(completion, str)))
        else:
            scores.append(float(isinstance(completion, list) and [m["role"] for m in completion] == ["assistant"]))
    return scores


def sees_extra_columns(completions, prompts, solution, difficulty, **kwargs) -> list[float]:
    """1.0 per completion when the dataset's extra columns arrive, one value per completion."""
    ok = len(solution) == len(difficulty) == len(completions) and all(isinstance(d, int) for d in difficulty)
    return [1.0 if ok else 0.0] * len(completions)


def batch_size(completions, **kwargs) -> list[float]:
    """Each completion scores the number of completions in the call: TRL calls with the whole batch."""
    return [float(len(completions))] * len(completions)


def share_of_longest(completions, **kwargs) -> list[float]:
    """A batch-level reward, as TRL allows: each completion's length over the longest one's in the batch."""
    lengths = [len(_content(c)) for c in completions]
    return [length / max(lengths) for length in lengths]


def trainer_aware(completions, trainer_state, log_extra, log_metric, **kwargs) -> list[float]:
    """Scores the trainer's epoch; logs the step and each completion's text as columns, and the training
    progress and the batch size as metrics."""
    from transformers import TrainerState  # here: workers that never call this need not import transformers

    if not isinstance(trainer_state, TrainerState):
        raise TypeError(f"trainer_state is a {type(trainer_state).__name__}, not a transformers.TrainerState")
    log_extra("global_step", [trainer_state.global_step] * len(completions))
    log_extra("text", [_content(c) for c in completions])
    log_metric("progress", trainer_state.global_step / trainer_state.max_steps)
    log_metric("batch_size", float(len(completions)))
    return [float(trainer_state.epoch)] * len(completions)


def logs_then_fails_on_bad(completions, log_extra, **kwargs) -> list[float]:
    """Logs each completion's text, then raises when any completion of the call is "bad"; else 1.0 each."""
    log_extra("seen", [_content(c) for c in completions])
    if any(_content(c) == "bad" for c in completions):
        raise RuntimeError("cannot score 'bad'")
    return [1.0] * len(completions)


def keyword_names(completions, **kwargs) -> list[float]:
    """1.0 per completion; logs, as a column, the names of the keyword arguments the call got."""
    names = " ".join(sorted(kwargs))
    kwargs["log_extra"]("keywords", [names] * len(completions))
    return [1.0] * len(completions)
