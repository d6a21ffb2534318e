"""The shared learning-rate schedule: linear warm-up, then cosine to zero or constant."""

import math

import pytest

from diffpolicy.train.schedule import warmup_cosine


def test_warmup_is_linear_then_the_cosine_reaches_zero_at_the_total_and_stays():
    factor = warmup_cosine(4, 12)
    assert [factor(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)  # half-way through the decay
    assert factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(12) == pytest.approx(0.0, abs=1e-15)
    assert factor(50) == factor(12)


def test_without_decay_the_rate_stays_at_one_after_the_warm_up():
    factor = warmup_cosine(3, 10, decay=False)
    assert [factor(s) for s in (0, 1, 2, 3, 9, 10, 1000)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]


def test_no_warm_up_starts_at_the_full_rate():
    assert warmup_cosine(0, 10)(0) == 1.0
    assert warmup_cosine(0, 10, decay=False)(0) == 1.0
