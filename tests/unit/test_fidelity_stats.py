"""benchmarks.stats: t-intervals of a mean and of paired differences, on inputs whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats import Interval, mean_ci, paired_delta, t_cdf_exact, t_quantile, t_quantile_exact


def test_constant_differences_give_a_zero_width_interval():
    ref = np.array([20.0, 25.5, 31.25, 18.0, 27.0])
    iv = paired_delta(ref + 1.5, ref)
    assert iv.mean == pytest.approx(1.5) and iv.sd == pytest.approx(0.0, abs=1e-12)
    assert iv.low == pytest.approx(1.5) and iv.high == pytest.approx(1.5) and iv.half_width == pytest.approx(0)
    assert iv.n == 5 and iv.excludes(0.0) and not iv.excludes(1.5)


def test_known_sample_by_hand():
    # x = 1..5: mean 3, sd = sqrt(2.5); t_{0.975, 4} = 2.7764451051977987 (tables / scipy)
    iv = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert iv.mean == 3 and iv.sd == pytest.approx(math.sqrt(2.5))
    assert iv.low == pytest.approx(3 - half, rel=1e-12) and iv.high == pytest.approx(3 + half, rel=1e-12)
    assert half == pytest.approx(1.9632432, abs=1e-7)
    # paired: the interval of the differences, not of either sample
    ref = np.array([10.0, 40.0, 25.0, 33.0, 12.0])
    d = paired_delta(ref + np.array([1, 2, 3, 4, 5]), ref)
    assert (d.mean, d.low, d.high) == pytest.approx((iv.mean, iv.low, iv.high))
    assert d.excludes(0.0)


def test_matches_scipy_interval():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.normal(0.2, 1.0, size=37)
    for conf in (0.9, 0.95, 0.99):
        iv = mean_ci(x, conf)
        lo, hi = stats.t.interval(conf, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-10)


def test_exact_t_quantile_against_tables_and_scipy():
    assert t_quantile_exact(0.975, 1) == pytest.approx(12.706204736, rel=1e-9)
    assert t_quantile_exact(0.975, 10) == pytest.approx(2.228138852, rel=1e-9)
    assert t_quantile_exact(0.995, 30) == pytest.approx(2.749995654, rel=1e-9)
    assert t_quantile_exact(0.975, 199) == pytest.approx(1.971956544, rel=1e-9)
    assert t_quantile_exact(0.025, 4) == pytest.approx(-2.776445105, rel=1e-9)
    assert t_quantile_exact(0.5, 7) == 0.0
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 8, 23, 100):
        for p in (0.55, 0.8, 0.95, 0.975, 0.999):
            assert t_quantile_exact(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-12)
        for t in (-4.0, -1.0, 0.3, 2.0):
            assert t_cdf_exact(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-13)


def test_edge_cases():
    one = mean_ci([4.2])
    assert one.mean == 4.2 and math.isnan(one.low) and math.isnan(one.high)
    assert one.to_dict()["low"] is None and one.to_dict()["half_width"] is None  # strict JSON
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        paired_delta([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        mean_ci([1, 2], confidence=1.0)
    with pytest.raises(ValueError):
        t_cdf_exact(1.0, 0)
    assert isinstance(mean_ci([1, 2]), Interval)
