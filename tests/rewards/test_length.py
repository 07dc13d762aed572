"""DAPO overlong penalty."""

import pytest

from r1kit.rewards import OverlongPenalty
from r1kit.rewards.rules.length import length_penalty, overlong_penalty


def test_piecewise_formula():
    # L_max = 100, L_cache = 20: 0 up to 80, linear to -1 at 100, -1 beyond
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 81, 90, 100, 101, 10**6)] == [
        0.0,
        0.0,
        -0.05,
        -0.5,
        -1.0,
        -1.0,
        -1.0,
    ]


def test_tokens_from_completion_ids_or_characters():
    reward = OverlongPenalty(max_length=10, cache_length=4)
    assert reward(["a", "b"], completion_ids=[[1] * 6, [1] * 8]) == [0.0, -0.5]
    by_chars = OverlongPenalty(max_length=10, cache_length=4, unit="characters")
    assert by_chars(["x" * 12, "x"]) == [-1.0, 0.0]
    # the registered reward uses DAPO's L_max = 20480, L_cache = 4096
    assert length_penalty(["x", "y"], completion_ids=[[1] * 16384, [1] * 18432]) == [0.0, -0.5]


def test_missing_ids_and_bad_config_raise():
    with pytest.raises(KeyError, match="completion_ids"):
        OverlongPenalty()(["x"])
    with pytest.raises(ValueError, match="cache_length"):
        OverlongPenalty(max_length=10, cache_length=11)
    with pytest.raises(ValueError, match="unit"):
        OverlongPenalty(unit="words")
