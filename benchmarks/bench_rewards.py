"""Throughput of the math-accuracy reward on GSM8K's 5,276 labelled model solutions.

Measures, in one run and on the same data:
  - our math_accuracy called directly in this process;
  - the same through a RewardSuite with 1 and with N worker processes (the way a
    trainer calls it: hard per-completion time limits), worker start-up timed apart;
  - both again with every final answer re-written as \boxed{\frac{N}{1}}, which
    takes math-verify's sympy path instead of the plain-number comparison;
  - a training-step load: repeated score() calls of `--step-size` completions with
    math_accuracy + format, the per-call latency a trainer pays every step;
  - TRL's `accuracy_reward` (math-verify on the whole text) as the peer, with its
    agreement with the same labels;
  - the same rows on the hand-labelled competition-style answers in
    tests/rewards/data (tuples, sets, intervals, matrices, text, several boxes).

    python benchmarks/bench_rewards.py --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1kit.rewards import RewardSuite, RewardSuiteConfig, math_accuracy
from tests.rewards.competition_data import labelled_answers

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
ROOT = Path(__file__).resolve().parents[1]


FINAL_LINE_RE = re.compile(r"\nA: (-?[\d,]*\.?\d+)\s*$")


def find_data(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [ROOT / "shared/data/gsm8k", ROOT.parent / "shared/data/gsm8k"]
    for candidate in candidates:
        if (candidate / "example_model_solutions.jsonl").exists():
            return candidate
    raise SystemExit(f"example_model_solutions.jsonl not found in {[str(c) for c in candidates]}; pass --data")


def load(directory: Path) -> tuple[list[str], list[str], list[str], list[bool]]:
    """(questions, solutions, references "...#### N", labels) for every labelled solution."""
    with open(directory / "test.jsonl") as f:
        references = {row["question"]: row["answer"] for row in map(json.loads, f)}
    questions, solutions, refs, labels = [], [], [], []
    with open(directory / "example_model_solutions.jsonl") as f:
        for row in map(json.loads, f):
            for model in MODELS:
                questions.append(row["question"])
                solutions.append(row[model]["solution"])
                refs.append(references[row["question"]])
                labels.append(row[model]["is_correct"])
    return questions, solutions, refs, labels


def load_competition() -> tuple[list[str], list[str], list[str], list[bool]]:
    """(questions, completions, gold answers, labels) of the hand-labelled competition set."""
    answers = labelled_answers()
    return [""] * len(answers), [a.completion for a in answers], [a.gold for a in answers], [a.label for a in answers]


def as_latex_fractions(data: tuple) -> tuple:
    """The same data with each final "A: N" re-written as \\boxed{\\frac{N}{1}}."""
    questions, solutions, refs, labels = data
    rewritten = [FINAL_LINE_RE.sub(lambda m: f"\n\\boxed{{\\frac{{{m.group(1)}}}{{1}}}}", s) for s in solutions]
    return questions, rewritten, refs, labels


def agreement(scores: list[float | None], labels: list[bool]) -> float:
    return sum((s == 1.0) == label for s, label in zip(scores, labels, strict=True)) / len(labels)


def report(name: str, n: int, seconds: float, agree: float | None = None, extra: str = "") -> None:
    agree_text = f"{agree:8.2%}" if agree is not None else " " * 8
    print(f"{name:<48} {n / seconds:>10,.0f} /s {seconds:>8.2f} s {agree_text}  {extra}")


def bench_direct(data: tuple, label: str) -> None:
    _, solutions, refs, labels = data
    start = time.perf_counter()
    scores = math_accuracy(solutions, answer=refs)
    seconds = time.perf_counter() - start
    report(f"math_accuracy{label}, in-process", len(solutions), seconds, agreement(scores, labels))


def bench_suite(data: tuple, workers: int, label: str) -> None:
    questions, solutions, refs, labels = data
    start = time.perf_counter()
    with RewardSuite(["math_accuracy"], config=RewardSuiteConfig(num_workers=workers)) as suite:
        started = time.perf_counter() - start
        start = time.perf_counter()
        result = suite.score(questions, solutions, {"answer": refs})
        seconds = time.perf_counter() - start
    scores = result.scores["math_accuracy"].tolist()
    name = f"math_accuracy{label}, suite, {workers} worker{'s' * (workers > 1)}"
    report(name, len(solutions), seconds, agreement(scores, labels), f"(start-up {started:.2f} s)")


def bench_training_step(data: tuple, workers: int, step_size: int, steps: int) -> None:
    questions, solutions, refs, _ = data
    with RewardSuite(["math_accuracy", "format"], config=RewardSuiteConfig(num_workers=workers)) as suite:
        latencies = []
        for step in range(steps):
            window = slice(step * step_size, (step + 1) * step_size)
            start = time.perf_counter()
            suite.score(questions[window], solutions[window], {"answer": refs[window]})
            latencies.append(time.perf_counter() - start)
    median = statistics.median(latencies)
    name = f"step of {step_size} x 2 rewards, {workers} workers"
    report(name, step_size, median, None, f"(median of {steps} calls: {median * 1e3:.0f} ms per step)")


def bench_trl(data: tuple, label: str = "") -> None:
    try:
        from trl.rewards import accuracy_reward
    except ImportError:
        print("TRL accuracy_reward: not installed")
        return
    _, solutions, refs, labels = data
    completions = [[{"role": "assistant", "content": s}] for s in solutions]
    gold = [r.rsplit("####", 1)[1].strip() if "####" in r else r for r in refs]
    start = time.perf_counter()
    scores = accuracy_reward(completions, gold)
    report(
        f"TRL accuracy_reward{label}, in-process",
        len(solutions),
        time.perf_counter() - start,
        agreement(scores, labels),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder with GSM8K's test.jsonl and example_model_solutions.jsonl")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    parser.add_argument("--step-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    data = load(find_data(args.data))
    print(f"{len(data[1])} GSM8K solutions, {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
    print(f"{'what':<48} {'throughput':>13} {'time':>10} {'agreement':>9}")
    for label, workload in (("", data), (" (LaTeX)", as_latex_fractions(data))):
        bench_direct(workload, label)
        for workers in args.workers:
            bench_suite(workload, workers, label)
    bench_training_step(data, max(args.workers), args.step_size, args.steps)
    bench_trl(data)
    competition = load_competition()
    print(f"\n{len(competition[1])} hand-labelled competition-style answers")
    bench_direct(competition, " (competition)")
    for workers in args.workers:
        bench_suite(competition, workers, " (competition)")
    bench_trl(competition, " (competition)")


if __name__ == "__main__":
    main()
