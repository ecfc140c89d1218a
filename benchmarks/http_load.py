"""``scalekv bench load --endpoint URL``: the load harness's stream over HTTP, plus goodput.

The same stream as every other target (``benchmarks.load``: classes, seeds, Poisson/gamma
arrivals, ``--max-concurrency`` as a client-side semaphore), sent as OpenAI image requests
(``n=1`` each, the policy and budget as extra fields) from one asyncio client (httpx), so a
thousand requests in flight cost no threads. Per request: end to end is the client's send to
the response; time to first scale is e2e minus the server's own first-scale-to-final time
(its ``scalekv`` extension field), the same correction the cluster target makes. The pool
series is sampled from ``/health`` (a lower bound between samples), preemptions from
``/metrics``.

Goodput (``--goodput e2e:SECONDS ttfs:SECONDS``, as ``vllm bench serve --goodput`` but in
seconds): images per second that met every SLO, over the run's duration. Works on any target's
report (``apply_goodput``). ``concurrency_notes`` says when a run's concurrency, and so its
ratios to the baseline, was set by ``--max-concurrency`` rather than by KV memory.
"""

from __future__ import annotations

import asyncio
import math
import time

from benchmarks.arrivals import LoadRequest
from benchmarks.load import LoadConfig, PolicySpec, RequestRecord, RunResult, Timeline, _records

SLO_KEYS = {"e2e": "e2e_s", "ttfs": "ttfs_s"}
LOW_POOL_USAGE = 0.5  # a run whose pool peak stayed below this was not limited by memory


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["e2e:5", "ttfs:0.5"]`` -> ``{"e2e": 5.0, "ttfs": 0.5}`` (seconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            key, _, val = part.strip().partition(":")
            if key not in SLO_KEYS:
                raise ValueError(f"goodput: unknown SLO {key!r} (known: {', '.join(SLO_KEYS)}; e.g. e2e:5)")
            try:
                v = float(val)
            except ValueError:
                raise ValueError(f"goodput: expected {key}:SECONDS, got {part!r}") from None
            if not v > 0:
                raise ValueError(f"goodput: {key} must be > 0 seconds, got {v}")
            out[key] = v
    return out


def apply_goodput(report: dict, slos: dict[str, float]) -> dict:
    """Add ``summary["goodput"]`` to every run: requests that met every SLO and their rate."""
    if not slos:
        return report
    report["goodput_slos"] = dict(slos)
    for run in report["runs"]:
        s = run["summary"]
        good = 0
        for r in run["requests"]:
            if r["ok"] and all(r.get(SLO_KEYS[k]) is not None and r[SLO_KEYS[k]] <= v for k, v in slos.items()):
                good += 1
        dur = s["duration_s"]
        s["goodput"] = {"slos": dict(slos), "good": good, "fraction": round(good / max(1, s["num_requests"]), 4),
                        "images_per_s": round(good / dur, 6) if dur > 0 else 0.0}
    return report


def _peak_in_flight(requests: list[dict]) -> int:
    """Most requests the client had out at once (sent, not yet answered)."""
    events = []
    for r in requests:
        if r.get("sent_s") is not None and r.get("done_s") is not None:
            events += [(r["sent_s"], 1), (r["done_s"], -1)]
    peak = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        peak = max(peak, cur)
    return peak


def concurrency_notes(report: dict) -> list[str]:
    """Runs whose concurrency hit ``--max-concurrency`` while the pool stayed low: their
    throughput and ratios were set by the client's limit, not by KV memory."""
    limit = report["workload"].get("max_concurrency")
    if not limit:
        return []
    notes = []
    for run in report["runs"]:
        s = run["summary"]
        peak = _peak_in_flight(run["requests"])
        run["summary"]["client_in_flight_peak"] = peak
        if peak >= limit and s["pool_usage_peak"] < LOW_POOL_USAGE:
            notes.append(f"note: {run['label']} at {run['request_rate']} req/s: concurrency was set by "
                         f"--max-concurrency {limit} (client peak {peak} in flight), not by memory (pool peak "
                         f"{100 * s['pool_usage_peak']:.1f}%): its ratios compare the client limit, not KV policies")
    return notes


def format_extras(report: dict) -> str:
    """Lines after ``format_table``: goodput per run, then the concurrency notes."""
    lines = []
    if report.get("goodput_slos"):
        slos = ", ".join(f"{k} <= {v:g}s" for k, v in report["goodput_slos"].items())
        lines.append(f"goodput (SLOs: {slos}):")
        for run in report["runs"]:
            g = run["summary"]["goodput"]
            lines.append(f"  {run['label']} at {run['request_rate']} req/s: {g['images_per_s']:.3f} img/s, "
                         f"{g['good']}/{run['summary']['num_requests']} met ({100 * g['fraction']:.1f}%)")
    lines += concurrency_notes(report)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the target
class HttpTarget:
    """A ``scalekv serve`` endpoint (loopback in the tests)."""

    mode = "http"

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        import httpx

        self.endpoint = endpoint.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        r = httpx.get(f"{self.endpoint}/v1/models", headers=self.headers, timeout=30)
        if r.status_code != 200:
            raise ConnectionError(f"{self.endpoint}/v1/models answered {r.status_code}: {r.text[:300]}")
        m = r.json()["data"][0]
        self.info = m.get("scalekv") or {}
        self.model_name = m["id"]
        self.num_classes = int(self.info.get("num_classes") or 1)
        self.weights = None

    def describe(self) -> str:
        return f"HTTP server at {self.endpoint} (OpenAI images API, n=1 per request)"

    def engine_dict(self) -> dict:
        return {k: self.info.get(k) for k in ("block_size", "page_bytes", "num_pages", "default_policy",
                                              "default_kv_budget")}

    def run(self, spec: PolicySpec, stream: list[LoadRequest], rate: float, cfg: LoadConfig,
            on_done=None) -> RunResult:
        return asyncio.run(self._run(spec, stream, rate, cfg, on_done))

    def _body(self, spec: PolicySpec, class_label: int, seed: int) -> dict:
        return {"model": self.model_name, "prompt": str(class_label), "n": 1, "seed": seed,
                "policy": spec.policy, "kv_budget": spec.kv_budget, "response_format": "b64_json"}

    async def _run(self, spec, stream, rate, cfg, on_done) -> RunResult:
        import httpx

        limits = httpx.Limits(max_connections=max(8, cfg.max_concurrency or len(stream)) + 4)
        async with httpx.AsyncClient(base_url=self.endpoint, headers=self.headers, timeout=self.timeout,
                                     limits=limits) as http:
            for i in range(cfg.warmup):
                r = await http.post("/v1/images/generations", json=self._body(spec, stream[0].class_label,
                                                                             stream[0].seed + 7919 + i))
                if r.status_code != 200:
                    return self._failed(spec, rate, stream, f"warm-up: HTTP {r.status_code}: {_message(r)}")
            pre0 = await _preemptions(http)
            recs = _records(stream)
            tl = Timeline()
            peak = {"used": 0}
            t0 = time.perf_counter()
            stop = asyncio.Event()
            sampler = asyncio.create_task(self._sample(http, t0, cfg.sample_interval_s, tl, peak, stop))
            sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

            async def one(r: LoadRequest, rec: RequestRecord) -> None:
                try:
                    sent = time.perf_counter() - t0
                    rec.sent_s = rec.added_s = round(sent, 6)
                    try:
                        resp = await http.post("/v1/images/generations", json=self._body(spec, r.class_label, r.seed))
                    except httpx.HTTPError as e:
                        rec.error = f"{type(e).__name__}: {e}"
                        resp = None
                    now = time.perf_counter() - t0
                    rec.done_s, rec.e2e_s = round(now, 6), round(now - sent, 6)
                    if resp is not None and resp.status_code == 200:
                        ext = resp.json()["data"][0].get("scalekv") or {}
                        rec.ok = True
                        rec.kv_peak_bytes = int(ext.get("kv_peak_bytes") or 0)
                        if ext.get("ttfs_s") is not None and ext.get("e2e_s") is not None:
                            rec.ttfs_s = round(rec.e2e_s - (ext["e2e_s"] - ext["ttfs_s"]), 6)
                    elif resp is not None:
                        rec.error = f"HTTP {resp.status_code}: {_message(resp)}"
                finally:
                    if sem is not None:
                        sem.release()
                    if on_done:
                        on_done()

            async def send_all() -> None:
                tasks = []
                for r in sorted(stream, key=lambda q: (q.arrival_s, q.index)):
                    wait = r.arrival_s - (time.perf_counter() - t0)
                    if wait > 0 and not math.isinf(wait):
                        await asyncio.sleep(wait)
                    if sem is not None:
                        await sem.acquire()
                    tasks.append(asyncio.create_task(one(r, recs[r.request_id])))
                await asyncio.gather(*tasks)

            try:
                await asyncio.wait_for(send_all(), timeout=cfg.max_duration_s)
            except asyncio.TimeoutError:
                now = time.perf_counter() - t0
                why = f"aborted: the run passed --max-duration {cfg.max_duration_s:g}s"
                for rec in recs.values():
                    if rec.done_s is None:
                        rec.error, rec.done_s = why, round(now, 6)
            stop.set()
            await sampler
            health = await _health(http)
            pre1 = await _preemptions(http)
        pool = (health or {}).get("pool") or {}
        done = [r.done_s for r in recs.values() if r.done_s is not None]
        return RunResult(spec, rate, list(recs.values()), tl, max(done, default=0.0),
                         int(pool.get("num_pages") or self.info.get("num_pages") or 0),
                         int(self.info.get("page_bytes") or 0), peak["used"],
                         "sampled from /health (a lower bound)", max(0, pre1 - pre0), 0, running_weighted=False,
                         pages_in_use_after=int(pool.get("used") or 0))

    async def _sample(self, http, t0, interval, tl: Timeline, peak: dict, stop: asyncio.Event) -> None:
        while True:
            h = await _health(http)
            if h and h.get("pool"):
                p = h["pool"]
                peak["used"] = max(peak["used"], int(p["used"]))
                tl.add(time.perf_counter() - t0, 0.0, h.get("running", 0), h.get("waiting", 0),
                       {"used": p["used"], "reserved_pages": p["reserved"], "drafter_pages": p["drafter"],
                        "refiner_pages": p["refiner"]})
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except asyncio.TimeoutError:
                continue

    def _failed(self, spec, rate, stream, error: str) -> RunResult:
        recs = _records(stream)
        for r in recs.values():
            r.error = error
        return RunResult(spec, rate, list(recs.values()), Timeline(), 0.0, int(self.info.get("num_pages") or 0),
                         int(self.info.get("page_bytes") or 0), 0, "none (the run failed)", 0, 0,
                         running_weighted=False)


def _message(resp) -> str:
    try:
        return resp.json()["error"]["message"]
    except Exception:
        return resp.text[:300]


async def _health(http) -> dict | None:
    try:
        return (await http.get("/health")).json()
    except Exception:
        return None


async def _preemptions(http) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = (await http.get("/metrics")).text
    except Exception:
        return 0
    for fam in text_string_to_metric_families(text):
        if fam.name == "scalekv:num_preemptions":
            return int(sum(s.value for s in fam.samples))
    return 0
