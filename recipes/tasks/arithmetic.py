"""Procedurally generated arithmetic word problems with step-by-step solutions.

The embedded default task: small enough that a tiny policy learns it on a CPU in
minutes. Every problem chains one or more operations on small integers, and its
solution shows each step in the R1 format:

    Question: Mia has 12 apples. She buys 7 more. Then she gives away 5. How many apples does Mia have now?
    <think> 12 + 7 = 19 . 19 - 5 = 14 </think> <answer> 14 </answer>

Like solutions distilled from a weaker model, a share of the training solutions
(`slip_rate`) contain one arithmetic slip: a step's result is off by one or two
and the error is carried through to the final answer. SFT imitates the slips;
GRPO, rewarded against the correct `answer` column, learns to stop making them.
That is the R1 recipe in miniature: a cold-start SFT on imperfect
demonstrations, then reinforcement learning against a verifier. Reference
answers are always correct, and held-out problems never contain slips.

Generation is a pure function of the seed. `arithmetic_splits` returns train
and held-out sets whose questions never overlap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from r1kit.grpo.options import ConfigError

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ada", "Ben", "Kai")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "eggs", "marbles", "stickers")
PRONOUN = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Ada": "She"}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Difficulty knobs of the synthetic task.

    max_start: the first quantity is drawn from [2, max_start].
    max_operand: added / subtracted quantities are drawn from [1, max_operand].
    max_factor: multipliers are drawn from [2, max_factor].
    max_steps: each problem chains 1..max_steps operations.
    slip_rate: share of solutions with one arithmetic slip carried to the answer.
    """

    max_start: int = 20
    max_operand: int = 10
    max_factor: int = 3
    max_steps: int = 2
    slip_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.max_start < 2 or self.max_operand < 1 or self.max_factor < 2 or self.max_steps < 1:
            raise ConfigError(f"invalid ArithmeticTaskConfig: {self}")
        if not 0 <= self.slip_rate <= 1:
            raise ConfigError(f"slip_rate must be in [0, 1], got {self.slip_rate}")


def _operation(rng: random.Random, value: int, cfg: ArithmeticTaskConfig) -> tuple[str, str, int]:
    """One operation on `value`: (sentence with {p} and {item} placeholders, op name, operand)."""
    ops = ["add", "sub", "mul"] if value * cfg.max_factor <= 200 else ["add", "sub"]
    op = rng.choice(ops if value > 1 else ["add", "mul"])
    if op == "add":
        b = rng.randint(1, cfg.max_operand)
        return rng.choice(("{p} buys {b} more.", "{p} finds {b} more.", "{p} gets {b} more.")), op, b
    if op == "sub":
        b = rng.randint(1, min(cfg.max_operand, value - 1))
        return rng.choice(("{p} gives away {b}.", "{p} loses {b}.", "{p} sells {b}.")), op, b
    b = rng.randint(2, cfg.max_factor)
    return f"{{p}} { ({2: 'doubles', 3: 'triples'}.get(b, f'multiplies by {b}')) } the {{item}}.", op, b


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def _worked_steps(start: int, operations: list[tuple[str, int]], slip: tuple[int, int] | None) -> tuple[str, int]:
    """The worked solution and its final value; `slip` = (step, error) makes that step's result wrong."""
    value, steps = start, []
    for k, (op, b) in enumerate(operations):
        result = _apply(op, value, b)
        if slip is not None and slip[0] == k:
            result += slip[1]
        steps.append(f"{value} {SYMBOL[op]} {b} = {result}")
        value = result
    return " . ".join(steps), value


def make_problem(rng: random.Random, cfg: ArithmeticTaskConfig, slip_rate: float) -> dict[str, str]:
    """One problem as a row: `prompt`, `completion` (worked solution) and the correct `answer`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUN.get(name, "He")
    start = value = rng.randint(2, cfg.max_start)
    sentences, operations = [f"{name} has {value} {item}."], []
    for k in range(rng.randint(1, cfg.max_steps)):
        sentence, op, b = _operation(rng, value, cfg)
        subject = pronoun if k == 0 else f"Then {pronoun.lower()}"
        sentences.append(sentence.replace("{p}", subject).replace("{b}", str(b)).replace("{item}", item))
        operations.append((op, b))
        value = _apply(op, value, b)
    slip = None
    if rng.random() < slip_rate:
        slip = (rng.randrange(len(operations)), rng.choice((-2, -1, 1, 2)))
    reasoning, stated = _worked_steps(start, operations, slip)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {
        "prompt": format_prompt(question),
        "completion": f"<think> {reasoning} </think> <answer> {stated} </answer>",
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
    with_slips: bool = True,
) -> Dataset:
    """`num_problems` distinct problems from `seed`, none of whose prompts is in `exclude`.

    `with_slips=False` makes every worked solution correct whatever `cfg.slip_rate` says.
    """
    cfg = cfg or ArithmeticTaskConfig()
    rng, rows, seen = random.Random(seed), [], set(exclude)
    slip_rate = cfg.slip_rate if with_slips else 0.0
    attempts = 0
    while len(rows) < num_problems:
        attempts += 1
        if attempts > 50 * num_problems:
            raise ConfigError(f"could not draw {num_problems} distinct problems with {cfg}")
        row = make_problem(rng, cfg, slip_rate)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return Dataset.from_list(rows)


def arithmetic_splits(
    num_train: int, num_eval: int, seed: int = 0, cfg: ArithmeticTaskConfig | None = None
) -> tuple[Dataset, Dataset]:
    """Train and held-out problems with disjoint prompts; held-out solutions never slip."""
    held_out = arithmetic_dataset(num_eval, seed=seed + 1_000_003, cfg=cfg, with_slips=False)
    train = arithmetic_dataset(num_train, seed=seed, cfg=cfg, exclude=frozenset(held_out["prompt"]))
    return train, held_out
