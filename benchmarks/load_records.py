"""Load test records: the configuration, per-request records, timelines, a run's result and its
summary, and the client-side sender. Plain data and arithmetic; ``load_runs.py`` fills them."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from benchmarks.arrivals import LoadRequest, gap_stats

PERCENTILES = (50, 90, 99)

# The fields every report has (tests check them; the plots and the table read them).
REPORT_FIELDS = ("model", "weights", "mode", "target", "machine", "date", "config", "engine", "pool", "workload",
                 "runs", "ratios", "baseline")
RUN_FIELDS = ("label", "policy", "kv_budget", "request_rate", "summary", "requests", "timeline")
SUMMARY_FIELDS = (
    "num_requests", "completed", "errors", "error_messages", "duration_s", "images_per_s",
    "e2e_s", "ttfs_s", "queue_s", "running_peak", "running_mean", "in_system_peak", "kv_peak_bytes",
    "kv_peak_pages", "kv_peak_source", "kv_mean_bytes", "pool_usage_peak", "pool_usage_mean",
    "request_kv_peak_bytes_mean", "preemptions", "steps", "send_lag_s_mean", "pages_in_use_after", "arrivals",
)
STAT_FIELDS = ("mean", "p50", "p90", "p99", "max")
REQUEST_FIELDS = ("request_id", "class_label", "seed", "arrival_s", "sent_s", "added_s", "done_s", "e2e_s",
                  "ttfs_s", "queue_s", "kv_peak_bytes", "ok", "error")
TIMELINE_FIELDS = ("t_s", "step_s", "running", "waiting", "used_pages", "reserved_pages", "drafter_pages",
                   "refiner_pages")
RATIO_FIELDS = ("images_per_s", "running_peak", "running_mean", "kv_peak_bytes", "e2e_p50", "ttfs_p50")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class PolicySpec:
    """A policy at a budget (``full`` always at 1.0)."""

    policy: str
    kv_budget: float

    @property
    def label(self) -> str:
        return self.policy if self.policy == "full" or self.kv_budget >= 1.0 else f"{self.policy}@{self.kv_budget:g}"


def parse_policy(text: str, default_budget: float) -> PolicySpec:
    """``NAME`` or ``NAME@BUDGET`` (e.g. ``scalekv@0.1``); the budget defaults to ``default_budget``."""
    from memory.policies import POLICIES

    name, _, budget = text.partition("@")
    name = name.strip()
    if name not in POLICIES:
        raise ValueError(f"policy: unknown policy {name!r} (available: {', '.join(POLICIES)})")
    try:
        b = float(budget) if budget else float(default_budget)
    except ValueError:
        raise ValueError(f"policy: cannot read the budget of {text!r} (expected NAME@FRACTION)") from None
    if not 0 < b <= 1:
        raise ValueError(f"kv_budget: must be a fraction in (0, 1], got {b} in {text!r}")
    return PolicySpec(name, 1.0 if name == "full" else b)


@dataclass
class LoadConfig:
    """What load to run. ``request_rates`` holds one rate, or several for a sweep (inf: all at once)."""

    policies: list[PolicySpec] = field(default_factory=lambda: [PolicySpec("full", 1.0)])
    num_requests: int = 32
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    normalize_arrivals: bool = False
    warmup: int = 1  # requests run (and not measured) on each engine / per worker before a run
    max_duration_s: float | None = None  # a run still going after this is aborted (its requests fail)
    sample_interval_s: float = 0.05  # cluster: how often the pool is sampled

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, got {self.num_requests}")
        if not self.policies:
            raise ValueError("policy: give at least one policy")
        labels = [p.label for p in self.policies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"policy: each policy (at its budget) once, got {labels}")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ValueError(f"request_rate: rates must be > 0 (inf: all at once), got {self.request_rates}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0 (1 = Poisson), got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"max_duration: must be > 0 seconds, got {self.max_duration_s}")
        if not self.sample_interval_s > 0:
            raise ValueError(f"sample_interval: must be > 0 seconds, got {self.sample_interval_s}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policies"] = [p.label for p in self.policies]
        d["request_rates"] = [_num(r) for r in self.request_rates]
        return d


# --------------------------------------------------------------------------- records
@dataclass
class RequestRecord:
    """One request as the client saw it (seconds since the start of the run)."""

    request_id: str
    class_label: int
    seed: int
    arrival_s: float
    sent_s: float | None = None  # arrival, or later when it waited for a concurrency slot
    added_s: float | None = None  # handed to the engine / cluster
    done_s: float | None = None
    e2e_s: float | None = None
    ttfs_s: float | None = None
    queue_s: float | None = None
    kv_peak_bytes: int = 0
    ok: bool = False
    error: str | None = None


@dataclass
class Timeline:
    """Samples after every step (local) or every ``sample_interval_s`` (cluster)."""

    t_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # length of the step that ended at t (0: a sample)
    running: list[int] = field(default_factory=list)  # requests running during that step
    waiting: list[int] = field(default_factory=list)
    used_pages: list[int] = field(default_factory=list)
    reserved_pages: list[int] = field(default_factory=list)
    drafter_pages: list[int] = field(default_factory=list)
    refiner_pages: list[int] = field(default_factory=list)

    def add(self, t: float, step: float, running: int, waiting: int, stats: dict) -> None:
        self.t_s.append(round(t, 6))
        self.step_s.append(round(step, 6))
        self.running.append(int(running))
        self.waiting.append(int(waiting))
        self.used_pages.append(int(stats.get("used", 0)))
        self.reserved_pages.append(int(stats.get("reserved_pages", 0)))
        self.drafter_pages.append(int(stats.get("drafter_pages", 0)))
        self.refiner_pages.append(int(stats.get("refiner_pages", 0)))


@dataclass
class RunResult:
    """What one (policy, rate) run measured, before summarising."""

    spec: PolicySpec
    request_rate: float
    requests: list[RequestRecord]
    timeline: Timeline
    duration_s: float
    num_pages: int
    page_bytes: int
    kv_peak_pages: int
    kv_peak_source: str
    preemptions: int
    steps: int
    running_weighted: bool  # the timeline's step_s weights running (local) or samples hold (cluster)
    pages_in_use_after: int = 0  # pool pages still taken when the run ended (0: every page returned)


def _num(x: float) -> float | str:
    """JSON has no infinity: write it as the string 'inf'."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _stats(values: list[float]) -> dict:
    if not values:
        return {k: None for k in STAT_FIELDS}
    a = np.asarray(values, dtype=float)
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    out["max"] = float(a.max())
    return {k: round(v, 6) for k, v in out.items()}


def _time_weighted(ts: list[float], vs: list[float], t_end: float) -> float:
    """Mean of a piecewise-constant series (each sample holds until the next) over [0, t_end]."""
    if not ts or t_end <= 0:
        return 0.0
    t = np.asarray(ts + [max(t_end, ts[-1])], dtype=float)
    return float(np.sum(np.asarray(vs, dtype=float) * np.diff(t)) / t_end)


def summarize(run: RunResult) -> dict:
    reqs = run.requests
    ok = [r for r in reqs if r.ok]
    errs = [r for r in reqs if not r.ok]
    tl = run.timeline
    dur = run.duration_s
    if run.running_weighted:  # running[i] ran for step_s[i]; idle time counts as 0
        running_mean = float(np.dot(tl.running, tl.step_s) / dur) if dur > 0 and tl.t_s else 0.0
    else:
        running_mean = _time_weighted(tl.t_s, tl.running, dur)
    in_system = [a + b for a, b in zip(tl.running, tl.waiting)]
    used_mean = _time_weighted(tl.t_s, tl.used_pages, dur)
    lags = [r.added_s - r.sent_s for r in reqs if r.added_s is not None and r.sent_s is not None]
    messages = []
    for r in errs:
        if r.error not in messages:
            messages.append(r.error)
    return {
        "num_requests": len(reqs),
        "completed": len(ok),
        "errors": len(errs),
        "error_messages": messages[:5],
        "duration_s": round(dur, 6),
        "images_per_s": round(len(ok) / dur, 6) if dur > 0 else 0.0,
        "e2e_s": _stats([r.e2e_s for r in ok]),
        "ttfs_s": _stats([r.ttfs_s for r in ok if r.ttfs_s is not None]),
        "queue_s": _stats([r.queue_s for r in ok if r.queue_s is not None]),
        "running_peak": max(tl.running, default=0),
        "running_mean": round(running_mean, 4),
        "in_system_peak": max(in_system, default=0),
        "kv_peak_bytes": int(run.kv_peak_pages * run.page_bytes),
        "kv_peak_pages": int(run.kv_peak_pages),
        "kv_peak_source": run.kv_peak_source,
        "kv_mean_bytes": int(used_mean * run.page_bytes),
        "pool_usage_peak": round(run.kv_peak_pages / run.num_pages, 6) if run.num_pages else 0.0,
        "pool_usage_mean": round(used_mean / run.num_pages, 6) if run.num_pages else 0.0,
        "request_kv_peak_bytes_mean": int(np.mean([r.kv_peak_bytes for r in ok])) if ok else 0,
        "preemptions": int(run.preemptions),
        "steps": int(run.steps),
        "send_lag_s_mean": round(float(np.mean(lags)), 6) if lags else 0.0,
        "pages_in_use_after": int(run.pages_in_use_after),
        "arrivals": {k: round(v, 6) for k, v in gap_stats([r.arrival_s for r in reqs]).items()},
    }


# --------------------------------------------------------------------------- the client side
class _Sender:
    """Which requests may be sent now: arrived, and a concurrency slot free. A slot freed at
    time t lets the next request go at max(its arrival, t) (that is its ``sent_s``)."""

    def __init__(self, stream: list[LoadRequest], max_concurrency: int | None) -> None:
        self.pending = deque(sorted(stream, key=lambda r: (r.arrival_s, r.index)))
        self.limit = max_concurrency
        self.slots = deque([0.0] * max_concurrency) if max_concurrency else None
        self.in_flight = 0

    def due(self, now: float) -> list[tuple[LoadRequest, float]]:
        out = []
        while self.pending and self.pending[0].arrival_s <= now and (self.limit is None or self.in_flight < self.limit):
            r = self.pending.popleft()
            sent = r.arrival_s if self.slots is None else max(r.arrival_s, self.slots.popleft())
            self.in_flight += 1
            out.append((r, min(sent, now)))
        return out

    def done(self, t: float) -> None:
        self.in_flight -= 1
        if self.slots is not None:
            self.slots.append(t)

    def next_arrival(self) -> float | None:
        return self.pending[0].arrival_s if self.pending else None


def _records(stream: list[LoadRequest]) -> dict[str, RequestRecord]:
    return {r.request_id: RequestRecord(r.request_id, r.class_label, r.seed, round(r.arrival_s, 6)) for r in stream}


