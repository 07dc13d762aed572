"""Reward functions that misbehave on purpose; workers import them as "tests.rewards.hostile_rewards:NAME".

Each looks at the completion text: "hang" loops forever, "boom" raises, "exit" kills
its process, anything else scores its length. Like any user function they get
whole-batch calls, except `misbehaving`, which declares itself element-wise.
"""

from __future__ import annotations

import os
import time


def misbehaving(completions: list[str], **columns: object) -> list[float | None]:
    """len(completion); "hang"/"spin" never return, "boom" raises, "exit" ends the process, "none" -> None."""
    scores: list[float | None] = []
    for text in completions:
        if text == "hang":
            while True:
                time.sleep(0.01)
        if text == "spin":
            while True:
                pass
        if text == "boom":
            raise ValueError("boom")
        if text == "exit":
            os._exit(3)
        scores.append(None if text == "none" else float(len(text)))
    return scores


misbehaving.elementwise = True  # scored one completion per task in workers, each under `timeout_s`


def sleepy(completions: list[str], *, seconds: list[float], **columns: object) -> list[float]:
    """1.0 per completion, after sleeping the sum of the `seconds` column."""
    time.sleep(sum(seconds))
    return [1.0] * len(completions)


def wrong_length(completions: list[str], **columns: object) -> list[float]:
    """One score too many: a contract violation the suite must report."""
    return [1.0] * (len(completions) + 1)


def worker_pid(completions: list[str], **columns: object) -> list[float]:
    """The id of the process that scored each completion."""
    return [float(os.getpid())] * len(completions)


def fails_on_bad(completions: list[str], **columns: object) -> list[float]:
    """1.0 per completion, but the whole call raises when any completion is "bad"."""
    if "bad" in completions:
        raise RuntimeError("cannot score 'bad'")
    return [1.0] * len(completions)


fails_on_bad.batched = True  # scored in the calling process, whole batch per call
