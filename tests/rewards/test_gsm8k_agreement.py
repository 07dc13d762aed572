"""Math accuracy against OpenAI's correctness labels on GSM8K's 5,276 labelled model solutions.

The full sweep runs through a RewardSuite with worker processes, the way a
trainer runs it; the rewrites check that the verdicts do not depend on how the
final answer is written.
"""

import time

import pytest

from r1kit.rewards import RewardSuite, RewardSuiteConfig, math_accuracy
from tests.rewards.gsm8k_data import gsm8k_dir, labelled_solutions, rewrite_final_answer

DATA = gsm8k_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="GSM8K data (shared/data/gsm8k) not found")
STYLES = ("boxed", "the_answer_is", "bold", "dollars", "thousands")


@pytest.fixture(scope="module")
def solutions():
    return labelled_solutions(DATA)


def test_agreement_with_labels_through_the_suite(solutions):
    assert len(solutions) == 5276
    config = RewardSuiteConfig(num_workers=2, timeout_s=10.0, on_error="raise")
    start = time.perf_counter()
    with RewardSuite(["math_accuracy"], config=config) as suite:
        result = suite.score(
            [s.question for s in solutions],
            [s.solution for s in solutions],
            {"answer": [s.reference for s in solutions]},
        )
    seconds = time.perf_counter() - start
    verdicts = result.scores["math_accuracy"].tolist()
    agreement = sum((v == 1.0) == s.is_correct for v, s in zip(verdicts, solutions, strict=True)) / len(solutions)
    print(f"GSM8K label agreement {agreement:.4%} on {len(solutions)} solutions in {seconds:.2f} s (2 workers)")
    assert agreement == 1.0


@pytest.mark.parametrize("style", STYLES)
def test_same_verdicts_when_the_final_answer_is_rewritten(solutions, style):
    original, rewritten, references = [], [], []
    for s in solutions:
        text = rewrite_final_answer(s.solution, style)
        if text is not None:
            original.append(s.solution)
            rewritten.append(text)
            references.append(s.reference)
    assert len(rewritten) > 5200
    before = math_accuracy(original, answer=references)
    after = math_accuracy(rewritten, answer=references)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert not changed, [rewritten[i][-80:] for i in changed[:5]]


@pytest.mark.slow
def test_same_verdicts_on_the_sympy_path_through_workers(solutions):
    """Every final answer as \\boxed{\\frac{N}{1}}: math-verify parses all 5,276 (about 10 s on 2 workers)."""
    pairs = [(rewrite_final_answer(s.solution, "latex_fraction"), s) for s in solutions]
    pairs = [(text, s) for text, s in pairs if text is not None]
    with RewardSuite(["math_accuracy"], config=RewardSuiteConfig(num_workers=2, on_error="raise")) as suite:
        result = suite.score(
            [s.question for _, s in pairs],
            [text for text, _ in pairs],
            {"answer": [s.reference for _, s in pairs]},
        )
    before = math_accuracy([s.solution for _, s in pairs], answer=[s.reference for _, s in pairs])
    assert result.scores["math_accuracy"].tolist() == before
