"""Success rate with the 95 % Wilson score interval."""

import math

import pytest

from diffpolicy.evaluation.stats import Z_95, success_rate, wilson_interval


def test_z_is_the_two_sided_95_percent_normal_quantile():
    assert 0.5 * math.erfc(-Z_95 / math.sqrt(2)) == pytest.approx(0.975, abs=1e-12)


@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.4901625, 0.9433178),      # R: prop.test(8, 10, correct = FALSE)$conf.int
    (50, 100, 0.4038315, 0.5961685),    # R: prop.test(50, 100, correct = FALSE)$conf.int
    (1, 20, 0.0088814, 0.2361311),      # R: prop.test(1, 20, correct = FALSE)$conf.int
])
def test_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-6)
    assert hi == pytest.approx(high, abs=1e-6)


@pytest.mark.parametrize("n", [1, 10, 100])
def test_all_failures_and_all_successes_have_closed_forms(n):
    z2 = Z_95 ** 2
    assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)), abs=1e-12)
    assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0), abs=1e-12)


def test_the_bound_at_an_observed_rate_of_zero_or_one_is_exactly_that_rate():
    """Never a bound on the wrong side of the rate (a negative error bar: matplotlib refuses it); in
    floating point Wilson's lower bound at 0 successes came out as ~1e-17 for n = 7, 9, 12, ..."""
    for n in range(1, 2001):
        assert wilson_interval(0, n)[0] == 0.0
        assert wilson_interval(n, n)[1] == 1.0


def test_the_success_curve_plots_rates_of_zero_and_one(tmp_path):
    from diffpolicy.evaluation.report import plot_success_curve, plot_success_curves

    points = [(x, success_rate([False] * (100 - k) + [True] * k).to_dict()) for x, k in [(1.0, 0), (2.0, 57), (3.0, 100)]]
    png = plot_success_curve(points, tmp_path / "curve.png", target=0.9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    several = plot_success_curves([("a", points), ("b", points[1:])], tmp_path / "curves.png", target=0.9)
    assert several.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("k, n", [(3, 7), (37, 50), (99, 100), (1, 1000)])
def test_bounds_solve_the_score_equation(k, n):
    """Wilson's bounds are the p with |p_hat - p| = z sqrt(p (1 - p) / n)."""
    p_hat = k / n
    for p in wilson_interval(k, n):
        assert abs(p_hat - p) == pytest.approx(Z_95 * math.sqrt(p * (1 - p) / n), abs=1e-12)


def test_success_rate_summary():
    rate = success_rate([True, False, True, True])
    assert (rate.successes, rate.n, rate.rate) == (3, 4, 0.75)
    assert (rate.low, rate.high) == wilson_interval(3, 4)
    assert rate.to_dict()["ci95_low"] == rate.low


@pytest.mark.parametrize("k, n, error", [(0, 0, ValueError), (5, 4, ValueError), (-1, 4, ValueError),
                                         (1.5, 4, TypeError)])
def test_bad_counts(k, n, error):
    with pytest.raises(error, match="n|successes"):
        wilson_interval(k, n)
