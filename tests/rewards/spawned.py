"""Entry point for scoring inside a process started by torch.multiprocessing (spawn), as accelerate does."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from r1kit.rewards import RewardSuite, RewardSuiteConfig


def score_in_child(rank: int, output: str) -> None:
    """Score with a worker-backed suite from a non-main thread of this spawned process; write the totals."""
    results: list[list[float]] = []

    def run() -> None:
        with RewardSuite(["math_accuracy", "format"], config=RewardSuiteConfig(num_workers=1)) as suite:
            result = suite.score(["q", "q"], ["<think>x</think> <answer>38</answer>", "39"], {"answer": ["38", "38"]})
            results.append(result.total.tolist())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    Path(output).write_text(json.dumps({"rank": rank, "total": results[0]}))
