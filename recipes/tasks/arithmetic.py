"""Procedurally generated arithmetic word problems with step-by-step solutions.

The embedded default task: small enough that a tiny policy learns it on a CPU in
minutes, rich enough that sampling errors remain after SFT for GRPO to fix.
Every problem chains one to three operations on small integers, and its
solution shows each step in the R1 format:

    Question: Mia has 12 apples. She buys 7 more. Then she gives away 5. How many apples does Mia have now?
    <think> 12 + 7 = 19 . 19 - 5 = 14 </think> <answer> 14 </answer>

Generation is a pure function of the seed. `arithmetic_splits` returns train
and held-out sets whose questions never overlap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ada", "Ben", "Kai")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "eggs", "marbles", "stickers")
PRONOUN = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Ada": "She"}


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Difficulty knobs of the synthetic task.

    max_start: the first quantity is drawn from [2, max_start].
    max_operand: added / subtracted quantities are drawn from [1, max_operand].
    max_factor: multipliers are drawn from [2, max_factor].
    max_steps: each problem chains 1..max_steps operations.
    worked_fraction: share of solutions that show their steps; the others go
        straight to the answer, `<think> </think> <answer> 14 </answer>`.
    """

    max_start: int = 30
    max_operand: int = 20
    max_factor: int = 4
    max_steps: int = 3
    worked_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_start < 2 or self.max_operand < 1 or self.max_factor < 2 or self.max_steps < 1:
            raise ValueError(f"invalid ArithmeticTaskConfig: {self}")
        if not 0 <= self.worked_fraction <= 1:
            raise ValueError(f"worked_fraction must be in [0, 1], got {self.worked_fraction}")


def _step(rng: random.Random, value: int, cfg: ArithmeticTaskConfig) -> tuple[str, str, int]:
    """One operation on `value`: returns (sentence, worked step, new value)."""
    ops = ["add", "sub", "mul"] if value * 2 <= 200 else ["add", "sub"]
    op = rng.choice(ops)
    if op == "sub" and value <= 1:
        op = "add"
    if op == "add":
        b = rng.randint(1, cfg.max_operand)
        sentence = rng.choice(("{p} buys {b} more.", "{p} finds {b} more.", "{p} gets {b} more."))
        return sentence.replace("{b}", str(b)), f"{value} + {b} = {value + b}", value + b
    if op == "sub":
        b = rng.randint(1, min(cfg.max_operand, value - 1))
        sentence = rng.choice(("{p} gives away {b}.", "{p} loses {b}.", "{p} sells {b}."))
        return sentence.replace("{b}", str(b)), f"{value} - {b} = {value - b}", value - b
    b = rng.randint(2, cfg.max_factor)
    times = {2: "doubles", 3: "triples"}.get(b, f"multiplies by {b}")
    return f"{{p}} {times} the {{item}}.", f"{value} * {b} = {value * b}", value * b


def make_problem(rng: random.Random, cfg: ArithmeticTaskConfig) -> dict[str, str]:
    """One problem as a row: `prompt`, `completion` (worked solution) and `answer`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUN.get(name, "He")
    value = rng.randint(2, cfg.max_start)
    sentences, steps = [f"{name} has {value} {item}."], []
    for k in range(rng.randint(1, cfg.max_steps)):
        sentence, step, value = _step(rng, value, cfg)
        prefix = "Then " if k > 0 else ""
        subject = pronoun if not prefix else pronoun.lower()
        sentences.append(prefix + sentence.replace("{p}", subject).replace("{item}", item))
        steps.append(step)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    reasoning = " . ".join(steps) if rng.random() < cfg.worked_fraction else ""
    return {
        "prompt": format_prompt(question),
        "completion": f"<think> {reasoning} </think> <answer> {value} </answer>".replace("  ", " "),
        "answer": str(value),
    }


def format_prompt(question: str) -> str:
    """The prompt the embedded policy sees for a question."""
    return f"Question: {question}\n"


def arithmetic_dataset(
    num_problems: int,
    seed: int,
    cfg: ArithmeticTaskConfig | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Dataset:
    """`num_problems` distinct problems from `seed`, none of whose prompts is in `exclude`."""
    cfg = cfg or ArithmeticTaskConfig()
    rng, rows, seen = random.Random(seed), [], set(exclude)
    attempts = 0
    while len(rows) < num_problems:
        attempts += 1
        if attempts > 50 * num_problems:
            raise ValueError(f"could not draw {num_problems} distinct problems with {cfg}")
        row = make_problem(rng, cfg)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return Dataset.from_list(rows)


def arithmetic_splits(
    num_train: int, num_eval: int, seed: int = 0, cfg: ArithmeticTaskConfig | None = None
) -> tuple[Dataset, Dataset]:
    """Train and held-out problems with disjoint prompts."""
    held_out = arithmetic_dataset(num_eval, seed=seed + 1_000_003, cfg=cfg)
    train = arithmetic_dataset(num_train, seed=seed, cfg=cfg, exclude=frozenset(held_out["prompt"]))
    return train, held_out
