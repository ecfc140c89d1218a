"""Load test: one request stream, several KV policies side by side (``scalekv bench load``).

The design follows vLLM's serving benchmark (`vllm bench serve`), adapted to images:
open-loop arrivals at ``--request-rate`` R (Poisson, or gamma with ``--burstiness``; see
``benchmarks/arrivals.py``) and/or a client-side concurrency limit (``--max-concurrency`` C,
a semaphore: request i is sent when it has arrived *and* one of the C slots is free). Every
policy runs on the **same** stream (classes, image seeds, arrival times), one after the other,
in one invocation, so their figures differ only by the policy.

Targets:
- local engine (default): an in-process ``ImageEngine`` per policy with a fixed pool
  (``--kv-pool-bytes``). The driver adds the requests whose time has come, runs one
  ``step()``, records the pool and the requests running, and sleeps until the next arrival
  when the engine is idle. A request that arrives during a step is admitted after it, as in
  any iteration-level engine; its latency still counts from its arrival.
- a local cluster it starts (``--cluster-workers N``) or a running one (``--address A``),
  through ``scheduler.client.ClusterClient``: the requests due at each tick go as one job,
  each request naming the policy and budget; results are pulled with ``get_results``.

Per request (seconds, from the time the client *sent* it: its arrival, or later when it
waited for a concurrency slot): end-to-end latency (``e2e``: until the image was returned),
time to first scale (``ttfs``: until the first scale's step ended), time until admission.
Per run: images/s (ok images / time from the start of the stream to the last result),
latency mean/p50/p90/p99, requests running (peak, time-weighted mean), requests in the system,
pool usage over time (pages used, reserved, drafter/refiner pages after every step), peak KV
bytes measured by the pool (its high-water mark of pages in use, times the page size),
preemptions and errors. Between policies: ratios to a baseline (``full`` when it is one of
them, else the first policy), at each request rate.

Cluster runs differ in what can be measured: the pool time series comes from the
scheduler's status (worker snapshots refreshed at every worker poll, so coarser than a step),
the peak KV bytes from each worker pool's high-water mark when the run raised it, else the
sampled maximum (``kv_peak_source`` says which), and latencies from the scheduler's own
timestamps (submit to result), so the client's polling interval does not inflate them.

    scalekv bench load --model var-tiny --random-init --num-requests 24 --max-concurrency 16 \\
        --policy full --policy sliding --kv-budget 0.1 --kv-pool-bytes 32MiB --json out/load.json --plot out/load
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.arrivals import LoadRequest, gap_stats, make_stream, with_rate

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


# --------------------------------------------------------------------------- local engine
def run_local(model, engine_config, spec: PolicySpec, stream: list[LoadRequest], request_rate: float,
              cfg: LoadConfig, on_done=None) -> RunResult:
    """Drive an in-process ``ImageEngine`` (a fresh pool) with the stream; see the module docstring."""
    from dataclasses import replace

    from engine.api import ImageEngine
    from engine.request import ImageRequest

    engine = ImageEngine(model, replace(engine_config, policy=spec.policy, kv_budget=spec.kv_budget))
    if cfg.warmup:
        warm = [ImageRequest(class_label=r.class_label, seed=r.seed + 7919, request_id=f"warmup{i}")
                for i, r in enumerate(stream[: cfg.warmup])]
        bad = [r for r in engine.generate(warm) if not r.ok]
        if bad:  # a policy the engine refuses (no scale profile ...): every request of the run fails the same way
            return _failed_run(spec, request_rate, stream, engine, bad[0].error)
    engine.pool.reset_peak()
    steps0, preempt0 = engine.num_steps, engine.num_preemptions
    recs = _records(stream)
    sender = _Sender(stream, cfg.max_concurrency)
    tl = Timeline()
    t0 = time.perf_counter()
    now = 0.0
    aborted = False
    tl.add(0.0, 0.0, 0, 0, engine.stats())
    while sender.pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        for r, sent in sender.due(now):
            rec = recs[r.request_id]
            rec.sent_s = round(sent, 6)
            rec.added_s = round(time.perf_counter() - t0, 6)
            engine.add_request(ImageRequest(class_label=r.class_label, seed=r.seed, request_id=r.request_id))
        if not engine.has_unfinished():  # idle: note it on the timeline, sleep until the next arrival
            if tl.running[-1] or tl.used_pages[-1]:
                tl.add(time.perf_counter() - t0, 0.0, 0, 0, engine.stats())
            nxt = sender.next_arrival()
            if nxt is not None:
                time.sleep(max(0.0, nxt - (time.perf_counter() - t0)))
            continue
        t_start = time.perf_counter() - t0
        out = engine.step()
        now = time.perf_counter() - t0
        ran = engine.num_running + sum(1 for r in out if r.ok or (r.error or "").startswith("engine step failed"))
        tl.add(now, now - t_start, ran, engine.num_waiting, engine.stats())
        for res in out:
            _finish_local(recs[res.request_id], res, now)
            sender.done(now)
            if on_done:
                on_done()
        if cfg.max_duration_s is not None and now > cfg.max_duration_s and not aborted:
            aborted = True
            why = f"aborted: the run passed --max-duration {cfg.max_duration_s:g}s"
            for res in engine.abort_all(why):
                _finish_local(recs[res.request_id], res, now)
                if on_done:
                    on_done()
            for r in sender.pending:
                recs[r.request_id].error = why + " before this request was sent"
                if on_done:
                    on_done()
            sender.pending.clear()
    done = [r.done_s for r in recs.values() if r.done_s is not None]
    duration = max(done, default=now)
    return RunResult(spec, request_rate, list(recs.values()), tl, duration, engine.pool.num_pages,
                     engine.pool.page_bytes, engine.pool.peak_used, "pool high-water mark",
                     engine.num_preemptions - preempt0, engine.num_steps - steps0, running_weighted=True,
                     pages_in_use_after=engine.pool.num_used)


def _finish_local(rec: RequestRecord, res, now: float) -> None:
    rec.done_s = round(now, 6)
    rec.ok = res.ok
    rec.error = res.error
    rec.kv_peak_bytes = int(res.kv_peak_bytes)
    if rec.sent_s is not None:
        rec.e2e_s = round(now - rec.sent_s, 6)
        lag = (rec.added_s or rec.sent_s) - rec.sent_s  # waited for the step that ran when it arrived
        if "first_scale_seconds" in res.stats:
            rec.ttfs_s = round(lag + res.stats["first_scale_seconds"], 6)
        if "queue_seconds" in res.stats:
            rec.queue_s = round(lag + res.stats["queue_seconds"], 6)


def _failed_run(spec: PolicySpec, request_rate: float, stream: list[LoadRequest], engine, error: str) -> RunResult:
    recs = _records(stream)
    for r in recs.values():
        r.error = error
    return RunResult(spec, request_rate, list(recs.values()), Timeline(), 0.0, engine.pool.num_pages,
                     engine.pool.page_bytes, 0, "none (the run failed)", 0, 0, running_weighted=True)


# --------------------------------------------------------------------------- cluster
ENGINE_KEYS = ("used", "reserved_pages", "drafter_pages", "refiner_pages", "num_requests_running",
               "num_requests_waiting", "num_pages", "page_bytes", "peak_used", "num_preemptions", "num_steps")


def _worker_engines(client) -> dict[str, dict]:
    """Each answering worker's engine counters, asked of the worker now (after its current step)."""
    out = {}
    for name, s in client.worker_stats().items():
        eng = s.get("engine")
        if eng:
            out[name] = {k: int(eng.get(k, 0) or 0) for k in ENGINE_KEYS}
    return out


class _ClusterSampler:
    """Samples every worker's pool on a background thread (fresh stats straight from the
    workers, so the client loop never waits for a step), summed over workers."""

    def __init__(self, client, t0: float, interval: float) -> None:
        import threading

        self.client, self.t0, self.interval = client, t0, interval
        self.timeline = Timeline()
        self.peak: dict[str, int] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-load-sampler", daemon=True)

    def start(self) -> _ClusterSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        try:
            engines = _worker_engines(self.client)
        except Exception as e:  # a worker restarting: keep sampling the others next time
            self.error = f"{type(e).__name__}: {e}"
            return
        t = time.perf_counter() - self.t0
        total = {k: sum(e[k] for e in engines.values()) for k in ENGINE_KEYS}
        for name, e in engines.items():
            self.peak[name] = max(self.peak.get(name, 0), e["used"])
        self.timeline.add(t, 0.0, total["num_requests_running"], total["num_requests_waiting"], total)

    def stop(self) -> Timeline:
        self._stop.set()
        self._thread.join(timeout=120)
        self.sample()
        return self.timeline


def run_cluster(client, spec: PolicySpec, stream: list[LoadRequest], request_rate: float, cfg: LoadConfig,
                on_done=None, fresh: bool = False) -> RunResult:
    """Drive a cluster through its client with the stream; see the module docstring. ``fresh``:
    the cluster was started for this run, so each worker pool's high-water mark is this run's
    (or its warm-up's, which is one request's: the same as any run's peak with one running)."""
    prefix = f"load-{uuid.uuid4().hex[:8]}-{spec.policy}"
    if cfg.warmup:
        n = cfg.warmup * max(1, len(client.status().get("workers", [])))
        warm = client.run([{"class_label": stream[0].class_label, "num": n, "seed": stream[0].seed + 7919,
                            "policy": spec.policy, "kv_budget": spec.kv_budget, "request_id": "warmup"}],
                          timeout=cfg.max_duration_s or 3600)
        bad = [r for r in warm if not r["ok"]]
        if bad:
            return _failed_cluster_run(spec, request_rate, stream, client, bad[0]["error"])
    before = _worker_engines(client)
    recs = _records(stream)
    sender = _Sender(stream, cfg.max_concurrency)
    active: dict[str, float] = {}  # job id -> client time of its submit call
    submitted_at: dict[str, float] = {}
    jobs = 0
    t0 = time.perf_counter()
    sampler = _ClusterSampler(client, t0, cfg.sample_interval_s).start()
    now = 0.0
    try:
        while sender.pending or active:
            now = time.perf_counter() - t0
            due = sender.due(now)
            if due:
                job_id = f"{prefix}-{jobs}"
                jobs += 1
                t_call = time.perf_counter() - t0
                records = []
                for r, sent in due:
                    rec = recs[r.request_id]
                    rec.sent_s, rec.added_s = round(sent, 6), round(t_call, 6)
                    submitted_at[r.request_id] = t_call
                    records.append({"class_label": r.class_label, "seed": r.seed, "request_id": r.request_id,
                                    "policy": spec.policy, "kv_budget": spec.kv_budget})
                client.submit(records, name=prefix, job_id=job_id)
                active[job_id] = t_call
            got = 0
            nxt = sender.next_arrival()
            for job_id in list(active):
                wait = 0.0
                if len(active) == 1:  # wait in the scheduler for a result, or until the next arrival is due
                    wait = 0.05 if nxt is None else max(0.0, min(0.05, nxt - (time.perf_counter() - t0)))
                batch = client.get_results(job_id, max_wait=wait)
                t_got = time.perf_counter() - t0
                for res in batch["results"]:
                    rec = recs.get(res["request_id"])
                    if rec is None or rec.done_s is not None:
                        continue
                    _finish_cluster(rec, res, t_got, submitted_at.get(res["request_id"], t_got))
                    sender.done(t_got)
                    got += 1
                    if on_done:
                        on_done()
                if batch["done"]:
                    del active[job_id]
            now = time.perf_counter() - t0
            if cfg.max_duration_s is not None and now > cfg.max_duration_s:
                why = f"aborted: the run passed --max-duration {cfg.max_duration_s:g}s"
                for rec in recs.values():
                    if rec.done_s is None:
                        rec.error, rec.done_s = why, round(now, 6)
                        if on_done:
                            on_done()
                break  # requests already on the cluster still run there; their results are not waited for
            if not active and sender.pending:
                time.sleep(max(0.0, min(0.05, sender.next_arrival() - now)))
            elif not got and len(active) > 1:
                time.sleep(0.005)
    finally:
        tl = sampler.stop()
    after = _worker_engines(client)
    peak, exact = 0, True
    for name, a in after.items():
        b = before.get(name, {})
        if a["peak_used"] > b.get("peak_used", 0) or (fresh and a["num_steps"] > b.get("num_steps", 0)):
            peak += a["peak_used"]  # this run's high-water mark
        else:
            peak += sampler.peak.get(name, 0)
            exact = False
    num_pages = sum(a["num_pages"] for a in after.values())
    page_bytes = max((a["page_bytes"] for a in after.values()), default=0)
    done = [r.done_s for r in recs.values() if r.done_s is not None]
    source = "pool high-water mark" if exact else "sampled after steps (a lower bound)"
    if len(after) > 1:
        source += ", summed over workers"
    return RunResult(spec, request_rate, list(recs.values()), tl, max(done, default=now), num_pages, page_bytes, peak,
                     source,
                     sum(a["num_preemptions"] - before.get(n, {}).get("num_preemptions", 0) for n, a in after.items()),
                     sum(a["num_steps"] - before.get(n, {}).get("num_steps", 0) for n, a in after.items()),
                     running_weighted=False, pages_in_use_after=sum(a["used"] for a in after.values()))


def _finish_cluster(rec: RequestRecord, res: dict, t_got: float, t_submit: float) -> None:
    """Latency from the scheduler's own clock (submit to result) when it reports it."""
    stats = res.get("stats") or {}
    rec.ok = bool(res.get("ok"))
    rec.error = res.get("error")
    rec.kv_peak_bytes = int(res.get("kv_peak_bytes") or 0)
    sent = t_submit if rec.sent_s is None else rec.sent_s
    wait = t_submit - sent
    total = stats.get("scheduler_total_seconds")
    rec.e2e_s = round(wait + total, 6) if total is not None else round(t_got - sent, 6)
    rec.done_s = round(sent + rec.e2e_s, 6)
    if "first_scale_seconds" in stats and res.get("seconds"):  # first scale to the engine's finish, taken off e2e
        rec.ttfs_s = round(rec.e2e_s - (float(res["seconds"]) - float(stats["first_scale_seconds"])), 6)
    if "scheduler_queue_seconds" in stats:
        rec.queue_s = round(wait + stats["scheduler_queue_seconds"] + stats.get("queue_seconds", 0.0), 6)


def _failed_cluster_run(spec, request_rate, stream, client, error: str) -> RunResult:
    recs = _records(stream)
    for r in recs.values():
        r.error = error
    after = _worker_engines(client)
    return RunResult(spec, request_rate, list(recs.values()), Timeline(), 0.0,
                     sum(a["num_pages"] for a in after.values()),
                     max((a["page_bytes"] for a in after.values()), default=0), 0, "none (the run failed)", 0, 0,
                     running_weighted=False)


# --------------------------------------------------------------------------- the whole benchmark
def ratios(runs: list[dict], baseline: str) -> list[dict]:
    """Each policy's figures over the baseline's, at each request rate (None where undefined)."""
    out = []
    for rate in dict.fromkeys(r["request_rate"] for r in runs):
        at = {r["label"]: r["summary"] for r in runs if r["request_rate"] == rate}
        base = at.get(baseline)
        if base is None:
            continue
        for label, s in at.items():
            if label == baseline:
                continue
            rec = {"request_rate": rate, "label": label, "baseline": baseline}
            for k in RATIO_FIELDS:
                a, b = _ratio_value(s, k), _ratio_value(base, k)
                rec[k] = round(a / b, 4) if a is not None and b not in (None, 0) else None
            out.append(rec)
    return out


def _ratio_value(summary: dict, key: str) -> float | None:
    if key in ("e2e_p50", "ttfs_p50"):
        return summary[key.split("_")[0] + "_s"]["p50"]
    return summary[key]


def run_load(target, cfg: LoadConfig, progress: bool = False) -> dict:
    """Run every (request rate, policy) on the same stream against ``target`` (``LocalTarget``
    or ``ClusterTarget``) and return the report (see ``REPORT_FIELDS``)."""
    from tqdm import tqdm

    from benchmarks.common import machine, today

    num_classes = target.num_classes
    base = make_stream(cfg.num_requests, num_classes, cfg.request_rates[0], cfg.burstiness, cfg.seed,
                       cfg.normalize_arrivals)
    total = cfg.num_requests * len(cfg.policies) * len(cfg.request_rates)
    bar = tqdm(total=total, desc="bench load", unit="img", disable=not progress)
    runs, pool = [], None
    try:
        for rate in cfg.request_rates:
            stream = with_rate(base, rate, cfg.burstiness, cfg.seed, cfg.normalize_arrivals)
            for spec in cfg.policies:
                bar.set_postfix_str(f"{spec.label} at {_rate_str(rate)} req/s")
                n0 = bar.n
                res = target.run(spec, stream, rate, cfg, on_done=lambda: bar.update(1))
                bar.update(max(0, n0 + len(stream) - bar.n))  # a run that failed as a whole
                summary = summarize(res)
                runs.append({"label": spec.label, "policy": spec.policy, "kv_budget": spec.kv_budget,
                             "request_rate": _num(rate), "summary": summary,
                             "requests": [asdict(r) for r in res.requests], "timeline": asdict(res.timeline)})
                if pool is None or not pool["num_pages"]:
                    pool = {"num_pages": res.num_pages, "page_bytes": res.page_bytes,
                            "total_bytes": res.num_pages * res.page_bytes}
    finally:
        bar.close()
    labels = [p.label for p in cfg.policies]
    baseline = "full" if "full" in labels else labels[0]
    return {
        "model": target.model_name,
        "weights": target.weights,
        "mode": target.mode,
        "target": target.describe(),
        "machine": machine(),
        "date": today(),
        "config": cfg.to_dict(),
        "engine": target.engine_dict(),
        "pool": pool,
        "workload": {
            "num_requests": cfg.num_requests, "seed": cfg.seed, "burstiness": cfg.burstiness,
            "max_concurrency": cfg.max_concurrency, "request_rates": [_num(r) for r in cfg.request_rates],
            "requests": [r.to_dict() for r in base],
        },
        "runs": runs,
        "ratios": ratios(runs, baseline),
        "baseline": baseline,
    }


class LocalTarget:
    """The in-process engine: one fresh ``ImageEngine`` per run, all sharing ``model``."""

    mode = "local-engine"

    def __init__(self, model, engine_config) -> None:
        self.model = model
        self.engine_config = engine_config
        self.num_classes = model.spec.var.num_classes
        self.model_name = model.spec.name
        self.weights = getattr(model, "source", None)

    def describe(self) -> str:
        device = next(self.model.var.parameters()).device
        return f"in-process ImageEngine on {device}"

    def engine_dict(self) -> dict:
        return self.engine_config.to_dict()

    def run(self, spec, stream, rate, cfg, on_done=None) -> RunResult:
        return run_local(self.model, self.engine_config, spec, stream, rate, cfg, on_done)


class ClusterTarget:
    """A scalekv cluster through ``ClusterClient``: a running one (``client``), or one started
    afresh for every run by ``factory()`` and stopped after it (exact pool peaks per run)."""

    def __init__(self, mode: str, where: str, client=None, factory=None, engine_config=None,
                 model_name: str | None = None, num_classes: int | None = None) -> None:
        if (client is None) == (factory is None):
            raise ValueError("ClusterTarget: give a client or a factory")
        self.mode, self.where = mode, where
        self.client, self.factory = client, factory
        self.engine_config = engine_config
        self.info: dict = {}
        if client is not None:
            client.wait_ready()
            self.info = client.status().get("model") or {}
        self.model_name = model_name or self.info.get("model")
        self.num_classes = int(num_classes or self.info.get("num_classes") or 1)
        self.weights = None
        self._workers = None

    def describe(self) -> str:
        fresh = ", a fresh cluster per run" if self.factory is not None else ""
        return f"{self.where}: {self._workers} live worker(s){fresh}"

    def engine_dict(self) -> dict:
        if self.engine_config is not None:
            return self.engine_config.to_dict()
        return {k: self.info.get(k) for k in ("block_size", "page_bytes", "num_pages", "default_policy",
                                              "default_kv_budget")}

    def run(self, spec, stream, rate, cfg, on_done=None) -> RunResult:
        if self.client is not None:
            self._count(self.client)
            return run_cluster(self.client, spec, stream, rate, cfg, on_done)
        client = self.factory()
        try:
            self._count(client)
            return run_cluster(client, spec, stream, rate, cfg, on_done, fresh=True)
        finally:
            client.stop()

    def _count(self, client) -> None:
        self._workers = sum(w.get("state") == "alive" for w in client.status().get("workers", []))


# --------------------------------------------------------------------------- outputs
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _rate_str(rate: float | str) -> str:
    return rate if isinstance(rate, str) else format(rate, "g")


def format_table(report: dict) -> str:
    """A plain text table, one row per (rate, policy), then the ratios to the baseline."""
    head = (f"{'policy':<14} {'rate':>6} {'ok/n':>7} {'img/s':>8} {'e2e p50':>8} {'p90':>7} {'p99':>7} "
            f"{'ttfs p50':>8} {'p90':>7} {'p99':>7} {'run pk':>6} {'mean':>6} {'KV peak MiB':>11} {'pool%':>6} "
            f"{'preempt':>7} {'err':>4}")
    lines = [f"{report['model']} ({report['mode']}), {report['workload']['num_requests']} requests, burstiness "
             f"{report['workload']['burstiness']:g}, max concurrency {report['workload']['max_concurrency']}, pool "
             f"{report['pool']['total_bytes'] / 2**20:.1f} MiB ({report['pool']['num_pages']} pages)", head]
    for r in report["runs"]:
        s = r["summary"]
        e, t = s["e2e_s"], s["ttfs_s"]
        lines.append(
            f"{r['label']:<14} {_rate_str(r['request_rate']):>6} "
            f"{s['completed']:>3}/{s['num_requests']:<3} {s['images_per_s']:>8.3f} {_fmt(e['p50']):>8} "
            f"{_fmt(e['p90']):>7} {_fmt(e['p99']):>7} {_fmt(t['p50']):>8} {_fmt(t['p90']):>7} {_fmt(t['p99']):>7} "
            f"{s['running_peak']:>6} {s['running_mean']:>6.2f} {s['kv_peak_bytes'] / 2**20:>11.2f} "
            f"{100 * s['pool_usage_peak']:>6.1f} {s['preemptions']:>7} {s['errors']:>4}")
    if report["ratios"]:
        lines.append("")
        lines.append(f"ratios to {report['baseline']} (same stream, same pool):")
        for q in report["ratios"]:
            parts = [f"{k} {_fmt(q[k], '.2f')}x" for k in RATIO_FIELDS]
            lines.append(f"  {q['label']} at {_rate_str(q['request_rate'])} req/s: " + ", ".join(parts))
    sampled = [f"{r['label']} at {_rate_str(r['request_rate'])}" for r in report["runs"]
               if "sampled" in r["summary"]["kv_peak_source"]]
    if sampled:
        lines.append(f"note: KV peak sampled between steps (a lower bound) for: {', '.join(sampled)}")
    if report["mode"] != "local-engine":
        lines.append("note: requests running on a cluster are sampled between steps (lower bounds)")
    errs = [(r["label"], m) for r in report["runs"] for m in r["summary"]["error_messages"]]
    for label, m in errs[:5]:
        lines.append(f"error ({label}): {m}")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pool_usage(report: dict, path: str | Path) -> None:
    """Pool usage (pages used / pool) and requests running over time, one line per policy;
    one column per request rate."""
    plt = _plt()
    rates = list(dict.fromkeys(r["request_rate"] for r in report["runs"]))
    fig, axes = plt.subplots(2, len(rates), figsize=(5.5 * len(rates), 6), squeeze=False, sharex="col")
    pages = report["pool"]["num_pages"] or 1
    for j, rate in enumerate(rates):
        for r in (r for r in report["runs"] if r["request_rate"] == rate):
            tl = r["timeline"]
            axes[0][j].step(tl["t_s"], [100 * u / pages for u in tl["used_pages"]], where="post", label=r["label"])
            xs, ys = _running_series(tl)
            axes[1][j].step(xs, ys, where="post", label=r["label"])
        axes[0][j].set_title(f"request rate {_rate_str(rate)} req/s")
        axes[0][j].set_ylabel("pool pages in use (%)")
        axes[1][j].set_ylabel("requests running")
        axes[1][j].set_xlabel("time (s)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: KV pool usage over time ({report['pool']['total_bytes'] / 2**20:.0f} MiB pool)")
    _save(fig, plt, path)


def _running_series(tl: dict) -> tuple[list[float], list[int]]:
    """Requests running as a step function: a step sample holds from the step's start."""
    xs, ys = [], []
    for t, step, n in zip(tl["t_s"], tl["step_s"], tl["running"]):
        xs.append(t - step)
        ys.append(n)
    if xs:
        xs.append(tl["t_s"][-1])
        ys.append(0 if tl["step_s"][-1] else ys[-1])
    return xs, ys


def plot_latency_cdf(report: dict, path: str | Path) -> None:
    """CDF of end-to-end latency (solid) and time to first scale (dashed) per policy, at the
    highest request rate of the run."""
    plt = _plt()
    rates = list(dict.fromkeys(r["request_rate"] for r in report["runs"]))
    rate = rates[-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(r for r in report["runs"] if r["request_rate"] == rate):
        color = f"C{i}"
        for key, style in (("e2e_s", "-"), ("ttfs_s", "--")):
            xs = np.sort([q[key] for q in r["requests"] if q["ok"] and q[key] is not None])
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", linestyle=style, color=color,
                        label=f"{r['label']} {'end to end' if key == 'e2e_s' else 'first scale'}")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"latency CDF at {_rate_str(rate)} req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def plot_throughput(report: dict, path: str | Path) -> None:
    """Images/s and p50 latency vs request rate, one line per policy (a sweep)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    finite = [float(r["request_rate"]) for r in report["runs"] if not math.isinf(float(r["request_rate"]))]
    x_inf = 2 * max(finite) if finite else 1.0  # "inf" (all at once) is drawn past the largest rate
    has_inf = len(finite) < len(report["runs"])

    def x_of(rate) -> float:
        return x_inf if math.isinf(float(rate)) else float(rate)

    for label in dict.fromkeys(r["label"] for r in report["runs"]):
        pts = [(x_of(r["request_rate"]), r["summary"]) for r in report["runs"] if r["label"] == label]
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["images_per_s"] for p in pts], marker="o", label=label)
        axes[1].plot(xs, [p[1]["e2e_s"]["p50"] for p in pts], marker="o", label=label)
    axes[0].set_ylabel("images/s")
    axes[1].set_ylabel("end-to-end latency p50 (s)")
    ticks = sorted({x_of(r["request_rate"]) for r in report["runs"]})
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(ticks, ["inf" if t == x_inf and has_inf else f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: throughput vs request rate")
    _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: str | None, plot_dir: str | None) -> list[str]:
    """The JSON report and the plots; returns the paths written."""
    import json

    written = []
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
        written.append(str(json_path))
    if plot_dir:
        d = Path(plot_dir)
        plot_pool_usage(report, d / "pool_usage.png")
        plot_latency_cdf(report, d / "latency_cdf.png")
        written += [str(d / "pool_usage.png"), str(d / "latency_cdf.png")]
        if len({r["request_rate"] for r in report["runs"]}) > 1:
            plot_throughput(report, d / "throughput_vs_rate.png")
            written.append(str(d / "throughput_vs_rate.png"))
    return written
