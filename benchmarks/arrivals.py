"""Arrival processes and the request stream of a load test.

Open-loop arrivals follow vLLM's serving benchmark (``vllm bench serve``): the gaps between
requests are drawn from Gamma(shape=b, scale=1/(R*b)), so the mean gap is 1/R whatever the
burstiness ``b``; b = 1 is a Poisson process (exponential gaps, coefficient of variation 1),
b < 1 is burstier (CV = 1/sqrt(b) > 1), b > 1 smoother, b = inf constant spacing. A rate of
``inf`` sends every request at t = 0 (combine it with a concurrency limit for a closed loop).

Everything is drawn from one seed, in independent streams, so the same ``--seed`` gives the
same classes, image seeds and arrival pattern; the class and seed of request i do not depend on
the rate or the burstiness, and a sweep over rates scales one unit-rate gap sequence (common
random numbers: rates differ only by a factor, not by noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LoadRequest:
    """One request of the stream: what to generate and when it arrives (seconds after start)."""

    index: int
    request_id: str
    class_label: int
    seed: int
    arrival_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for (classes and seeds, arrival gaps)."""
    a, b = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def unit_gaps(num: int, burstiness: float, seed: int) -> np.ndarray:
    """``num`` gaps of a unit-rate process: Gamma(b, 1/b), mean 1 (constant 1 for b = inf)."""
    if num < 0:
        raise ValueError(f"num_requests: must be >= 0, got {num}")
    if not burstiness > 0:
        raise ValueError(f"burstiness: must be > 0 (1 = Poisson), got {burstiness}")
    if math.isinf(burstiness):
        return np.ones(num)
    _, rng = _streams(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=num)


def arrival_times(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
                  normalize: bool = False) -> np.ndarray:
    """Arrival times in seconds (the first request arrives after one gap, as in a process
    started at t = 0). ``request_rate`` inf: all at 0. ``normalize`` rescales the gaps so the
    last arrival is exactly at ``num / request_rate`` (runs with different seeds then span the
    same time, as recent vLLM versions do)."""
    if not request_rate > 0:
        raise ValueError(f"request_rate: must be > 0 (inf: all at once), got {request_rate}")
    gaps = unit_gaps(num, burstiness, seed)
    if math.isinf(request_rate):
        return np.zeros(num)
    t = np.cumsum(gaps) / request_rate
    if normalize and num and t[-1] > 0:
        t = t * (num / request_rate) / t[-1]
    return t


def make_stream(num: int, num_classes: int, request_rate: float = math.inf, burstiness: float = 1.0,
                seed: int = 0, normalize: bool = False) -> list[LoadRequest]:
    """The request stream: request i has a uniformly drawn class, image seed ``seed*1_000_003 + i``
    (distinct per stream seed) and its arrival time. Independent of anything but the arguments."""
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    rng, _ = _streams(seed)
    classes = rng.integers(0, num_classes, size=num)
    times = arrival_times(num, request_rate, burstiness, seed, normalize)
    base = (seed * 1_000_003) % (2**62)
    return [LoadRequest(i, f"q{i}", int(classes[i]), base + i, float(times[i])) for i in range(num)]


def with_rate(stream: list[LoadRequest], request_rate: float, burstiness: float, seed: int,
              normalize: bool = False) -> list[LoadRequest]:
    """The same requests (classes, seeds) with arrivals at another rate: used by sweeps."""
    times = arrival_times(len(stream), request_rate, burstiness, seed, normalize)
    return [LoadRequest(r.index, r.request_id, r.class_label, r.seed, float(t)) for r, t in zip(stream, times)]


def gap_stats(times: np.ndarray | list[float]) -> dict:
    """Mean, std and coefficient of variation of the gaps of arrival times (first gap from 0)."""
    t = np.asarray(times, dtype=float)
    gaps = np.diff(np.concatenate([[0.0], t]))
    mean = float(gaps.mean()) if len(gaps) else 0.0
    std = float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0
    return {"mean_gap_s": mean, "std_gap_s": std, "cv": std / mean if mean > 0 else 0.0}
