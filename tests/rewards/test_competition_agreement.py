"""Math accuracy against hand labels on competition-style answers (tests/rewards/data)."""

import time
from collections import Counter

from r1kit.rewards import RewardSuite, RewardSuiteConfig
from tests.rewards.competition_data import labelled_answers


def test_agreement_with_hand_labels_through_the_suite():
    answers = labelled_answers()
    assert len(answers) >= 300 and {a.label for a in answers} == {True, False}
    config = RewardSuiteConfig(num_workers=2, timeout_s=10.0, on_error="raise")
    start = time.perf_counter()
    with RewardSuite(["math_accuracy"], config=config) as suite:
        result = suite.score(
            ["" for _ in answers], [a.completion for a in answers], {"answer": [a.gold for a in answers]}
        )
    seconds = time.perf_counter() - start
    verdicts = result.scores["math_accuracy"].tolist()
    wrong = [a for a, v in zip(answers, verdicts, strict=True) if (v == 1.0) != a.label]
    agreement = 1 - len(wrong) / len(answers)
    print(f"competition label agreement {agreement:.2%} on {len(answers)} answers in {seconds:.2f} s (2 workers)")
    assert agreement >= 0.99, (Counter(a.form for a in wrong), [(a.gold, a.completion[-80:]) for a in wrong[:5]])
