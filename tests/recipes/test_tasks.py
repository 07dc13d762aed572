import re
from pathlib import Path

import pytest

from r1kit.grpo.options import ConfigError
from r1kit.recipes.tasks.arithmetic import ArithmeticTaskConfig, arithmetic_dataset, arithmetic_splits
from r1kit.recipes.tasks.gsm8k import load_gsm8k, split_solution

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
STEP = re.compile(r"(-?\d+) ([+*-]) (\d+) = (-?\d+)")


def evaluate_steps(completion: str) -> tuple[bool, int]:
    """(every step is correct, the stated answer)."""
    ok = True
    for a, op, b, result in STEP.findall(completion):
        a, b, result = int(a), int(b), int(result)
        ok &= {"+": a + b, "-": a - b, "*": a * b}[op] == result
    return ok, int(re.search(r"<answer> (-?\d+) </answer>", completion).group(1))


def test_generation_is_deterministic_and_splits_are_disjoint():
    train, held_out = arithmetic_splits(500, 100, seed=1)
    again, _ = arithmetic_splits(500, 100, seed=1)
    assert train["prompt"] == again["prompt"]
    assert not set(train["prompt"]) & set(held_out["prompt"])
    assert len(set(train["prompt"])) == 500


def test_clean_solutions_are_correct_and_chain_their_steps():
    for row in arithmetic_dataset(300, seed=2, cfg=ArithmeticTaskConfig(max_steps=3)):
        ok, stated = evaluate_steps(row["completion"])
        assert ok and str(stated) == row["answer"], row
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("?\n")


def test_slips_are_carried_to_the_answer_and_held_out_never_slips():
    cfg = ArithmeticTaskConfig(slip_rate=0.3)
    train, held_out = arithmetic_splits(2000, 200, seed=0, cfg=cfg)
    slipped = [row for row in train if not evaluate_steps(row["completion"])[0]]
    assert 0.25 < len(slipped) / len(train) < 0.35
    assert all(str(evaluate_steps(r["completion"])[1]) != r["answer"] for r in slipped)
    assert all(evaluate_steps(r["completion"])[0] for r in held_out)


def test_task_config_validation():
    with pytest.raises(ConfigError, match="slip_rate"):
        ArithmeticTaskConfig(slip_rate=1.5)


def test_gsm8k_solution_split():
    assert split_solution("48/2 = <<48/2=24>>24 clips.\nTotal 1,272\n#### 1,272") == (
        "48/2 = 24 clips.\nTotal 1,272",
        "1272",
    )
    with pytest.raises(ConfigError, match="no '#### <answer>' line"):
        split_solution("no final line")


@pytest.mark.skipif(not GSM8K.exists(), reason="GSM8K data not beside the repository")
def test_gsm8k_from_local_files():
    test = load_gsm8k(str(GSM8K), "test")
    assert len(test) == 1319 and set(test.column_names) == {"prompt", "completion", "answer"}
    assert test[0]["answer"].endswith("#### 18") and test[0]["completion"].endswith("<answer> 18 </answer>")
    assert "<<" not in test[0]["completion"]
    single = load_gsm8k(str(GSM8K / "test.jsonl"), "test")
    assert single["prompt"] == test["prompt"]


def test_gsm8k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no train\.jsonl"):
        load_gsm8k(str(tmp_path), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\n')
    with pytest.raises(ConfigError, match="needs columns 'question' and 'answer'"):
        load_gsm8k(str(bad), "train")
