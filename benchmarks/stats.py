"""Small, pure statistics for benchmark comparisons: t-intervals of a mean and of paired differences.

The fidelity harness runs every policy on the same seeds, so two policies are compared seed by seed
(``paired_delta``): the per-seed differences remove the seed-to-seed spread that both share, which is
most of it. The interval is the Student t interval of the mean difference,
``mean ± t_{1-(1-c)/2, n-1} · sd / sqrt(n)``, with ``sd`` the sample standard deviation (ddof=1).

``t_quantile`` uses ``scipy.stats.t`` when scipy is importable and otherwise an exact evaluation
for integer degrees of freedom: the closed-form Student t CDF (Abramowitz & Stegun 26.7.3-4, a finite
sum of powers of cos θ, θ = atan(t / sqrt(ν))) inverted by bisection to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "mean_ci", "paired_delta", "t_cdf_exact", "t_quantile", "t_quantile_exact"]


@dataclass(frozen=True)
class Interval:
    """A sample mean and its two-sided t-interval (``low``/``high`` are NaN when n < 2)."""

    mean: float
    low: float
    high: float
    sd: float  # sample standard deviation (ddof=1) of the values; NaN when n < 2
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when ``value`` lies outside the interval (e.g. a difference that is not zero)."""
        return not (self.low <= value <= self.high)

    def to_dict(self) -> dict:
        """Plain fields plus ``half_width``; NaN (n < 2) becomes None so the dict is strict JSON."""
        d = {**asdict(self), "half_width": self.half_width}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


# --------------------------------------------------------------------------- t distribution
def t_cdf_exact(t: float, df: int) -> float:
    """CDF of Student's t with integer ``df`` >= 1 at ``t`` (closed form, A&S 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df: a positive integer, got {df}")
    df = int(df)
    if t == 0:
        return 0.5
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:  # A = (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... cos^(df-2))]
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):  # powers 1, 3, ..., df-2
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = 2 / math.pi * (theta + s * total)
    else:  # A = sin(theta) [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... cos^(df-2)]
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # powers 0, 2, ..., df-2
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * total
    a = min(max(a, 0.0), 1.0)  # A = P(|T| < |t|)
    return 0.5 + a / 2 if t > 0 else 0.5 - a / 2


def t_quantile_exact(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df``: ``t_cdf_exact`` inverted by bisection."""
    if not 0 < p < 1:
        raise ValueError(f"p: a probability in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile_exact(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf_exact(hi, df) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e300:
            raise OverflowError(f"t quantile {p} with df={df} is out of range")
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if t_cdf_exact(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (scipy when available, else the exact integer-df evaluation)."""
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is there in the dev environment
        return t_quantile_exact(p, df)
    return float(stats.t.ppf(p, df))


# --------------------------------------------------------------------------- intervals
def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with its two-sided Student t interval at ``confidence``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: a fraction in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        raise ValueError("values: need at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("values: all must be finite")
    mean = float(x.mean())
    if n < 2:
        nan = float("nan")
        return Interval(mean, nan, nan, nan, n, confidence)
    sd = float(x.std(ddof=1))
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, confidence)


def paired_delta(values: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray,
                 confidence: float = 0.95) -> Interval:
    """Mean of the per-item differences ``values[i] - reference[i]`` with its t interval.

    Both sequences must hold the same items in the same order (here: the same seeds)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    return mean_ci(a - b, confidence)
