"""``GET /metrics`` of ``scalekv serve``: Prometheus text format through prometheus-client.

Names follow vLLM's (``vllm:num_requests_running`` -> ``scalekv:num_requests_running``), so a
vLLM dashboard carries over with the prefix changed. Two kinds of series:

- cluster state, read from the scheduler's status at scrape time (cached ``STATUS_TTL_S``;
  worker snapshots are refreshed at every worker poll): requests running / waiting, KV pool
  usage and pages (total, used, drafter, refiner), preemptions;
- what this server saw: requests per policy, end-to-end and time-to-first-scale latency
  histograms, images generated, previews sent, errors by type.

Each server has its own ``CollectorRegistry`` (several servers in one process, tests) rather
than prometheus-client's global one. The Ray metrics of ``workers/telemetry.py``
(``scalekv_*`` through Ray's agent) are separate and unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds: var-tiny on a CPU core takes ~1.5 s an image, the official shapes on a GPU far less.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
STATUS_TTL_S = 0.5
disable_created_metrics()  # no *_created series (process-wide: prometheus-client has no per-registry switch)

# name -> (type, help): the documented families (README "Metrics"); tests check they all appear.
FAMILIES = {
    "scalekv:num_requests_running": ("gauge", "Requests admitted by a worker engine and stepping."),
    "scalekv:num_requests_waiting": ("gauge", "Requests waiting: in the scheduler queue or a worker's queue."),
    "scalekv:kv_cache_usage_perc": ("gauge", "Fraction of KV pool pages in use over all workers (1 = 100%)."),
    "scalekv:kv_cache_pages": ("gauge", "KV pool pages by state: total, used, reserved, drafter, refiner."),
    "scalekv:num_preemptions": ("counter", "Preempted requests (exact reservation: stays 0)."),
    "scalekv:request_policy": ("counter", "Images requested, by KV policy."),
    "scalekv:e2e_request_latency_seconds": ("histogram", "HTTP arrival to the final image, per image."),
    "scalekv:time_to_first_scale_seconds": ("histogram", "HTTP arrival to the first scale generated, per image."),
    "scalekv:images_generated": ("counter", "Images generated and returned."),
    "scalekv:preview_images": ("counter", "Preview images sent in streams."),
    "scalekv:request_errors": ("counter", "Failed requests or images, by error type."),
    "scalekv:workers": ("gauge", "Workers by state (alive, starting, suspect, dead)."),
}


class StatusCache:
    """The scheduler's status, fetched at most every ``ttl`` seconds (scrapes, /health, the page)."""

    def __init__(self, fetch: Callable[[], dict], ttl: float = STATUS_TTL_S) -> None:
        self._fetch, self.ttl = fetch, ttl
        self._lock = threading.Lock()
        self._value: dict | None = None
        self._at = 0.0
        self.error: str | None = None

    def get(self) -> dict | None:
        with self._lock:
            if self._value is not None and time.monotonic() - self._at < self.ttl:
                return self._value
            try:
                self._value, self.error = self._fetch(), None
            except Exception as e:  # the scheduler is gone: /health says so, /metrics skips cluster series
                self._value, self.error = None, f"{type(e).__name__}: {e}"
            self._at = time.monotonic()
            return self._value


def cluster_summary(status: dict | None) -> dict:
    """Sums over live workers of their last engine snapshot, plus the scheduler's queue."""
    out = {"running": 0, "waiting": 0, "num_pages": 0, "used": 0, "reserved": 0, "drafter": 0, "refiner": 0,
           "preemptions": 0, "queue_depth": 0, "in_flight": 0, "workers": {}}
    if not status:
        return out
    sched = status.get("scheduler", {})
    out["queue_depth"] = int(sched.get("queue_depth", 0))
    out["in_flight"] = int(sched.get("in_flight", 0))
    out["waiting"] = out["queue_depth"]
    for w in status.get("workers", []):
        out["workers"][w["state"]] = out["workers"].get(w["state"], 0) + 1
        if w["state"] != "alive":
            continue
        st = w.get("stats") or {}
        eng = st.get("engine") or {}
        out["running"] += int(eng.get("num_requests_running", 0))
        out["waiting"] += int(eng.get("num_requests_waiting", 0)) + int(st.get("inbox", 0))
        out["num_pages"] += int(eng.get("num_pages", w.get("num_pages") or 0))
        out["used"] += int(eng.get("used", 0))
        out["reserved"] += int(eng.get("reserved_pages", 0))
        out["drafter"] += int(eng.get("drafter_pages", 0))
        out["refiner"] += int(eng.get("refiner_pages", 0))
        out["preemptions"] += int(eng.get("num_preemptions", 0))
    return out


class _ClusterCollector:
    """Cluster-state families, computed at scrape time from the cached status."""

    def __init__(self, status: StatusCache, model: str) -> None:
        self.status, self.model = status, model

    def collect(self):
        s = cluster_summary(self.status.get())
        labels = ["model_name"]
        lv = [self.model]

        def gauge(name: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, FAMILIES[name][1], labels=labels)
            g.add_metric(lv, value)
            return g

        yield gauge("scalekv:num_requests_running", s["running"])
        yield gauge("scalekv:num_requests_waiting", s["waiting"])
        yield gauge("scalekv:kv_cache_usage_perc", s["used"] / s["num_pages"] if s["num_pages"] else 0.0)
        pages = GaugeMetricFamily("scalekv:kv_cache_pages", FAMILIES["scalekv:kv_cache_pages"][1],
                                  labels=[*labels, "state"])
        for state, key in (("total", "num_pages"), ("used", "used"), ("reserved", "reserved"),
                           ("drafter", "drafter"), ("refiner", "refiner")):
            pages.add_metric([*lv, state], s[key])
        yield pages
        pre = CounterMetricFamily("scalekv:num_preemptions", FAMILIES["scalekv:num_preemptions"][1], labels=labels)
        pre.add_metric(lv, s["preemptions"])
        yield pre
        workers = GaugeMetricFamily("scalekv:workers", FAMILIES["scalekv:workers"][1], labels=[*labels, "state"])
        for state in ("alive", "starting", "suspect", "dead"):
            workers.add_metric([*lv, state], s["workers"].get(state, 0))
        yield workers


class ServerMetrics:
    """What one ``scalekv serve`` exports; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, model: str, status: StatusCache) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]
        self.policy = Counter("scalekv:request_policy", FAMILIES["scalekv:request_policy"][1],
                              [*lab, "policy"], registry=r)
        self.e2e = Histogram("scalekv:e2e_request_latency_seconds",
                             FAMILIES["scalekv:e2e_request_latency_seconds"][1], lab, buckets=LATENCY_BUCKETS,
                             registry=r)
        self.ttfs = Histogram("scalekv:time_to_first_scale_seconds",
                              FAMILIES["scalekv:time_to_first_scale_seconds"][1], lab, buckets=LATENCY_BUCKETS,
                              registry=r)
        self.images = Counter("scalekv:images_generated", FAMILIES["scalekv:images_generated"][1], lab, registry=r)
        self.previews = Counter("scalekv:preview_images", FAMILIES["scalekv:preview_images"][1], lab, registry=r)
        self.errors = Counter("scalekv:request_errors", FAMILIES["scalekv:request_errors"][1], [*lab, "type"],
                              registry=r)
        for t in ("invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error",
                  "service_unavailable", "server_error", "cancelled"):
            self.errors.labels(model, t)  # every type present from the start, at 0
        self.images.labels(model)
        self.previews.labels(model)
        self.e2e.labels(model)
        self.ttfs.labels(model)
        r.register(_ClusterCollector(status, model))

    def error(self, kind: str, count: int = 1) -> None:
        self.errors.labels(self.model, kind).inc(count)

    def requested(self, policy: str, count: int) -> None:
        self.policy.labels(self.model, policy).inc(count)

    def image_done(self, e2e_s: float, ttfs_s: float | None) -> None:
        self.images.labels(self.model).inc()
        self.e2e.labels(self.model).observe(e2e_s)
        if ttfs_s is not None:
            self.ttfs.labels(self.model).observe(ttfs_s)

    def preview_sent(self) -> None:
        self.previews.labels(self.model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
