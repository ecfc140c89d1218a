"""Load test runs: one policy's request stream against the in-process engine or a Ray cluster."""

from __future__ import annotations

import time
import uuid

from benchmarks.arrivals import LoadRequest
from benchmarks.load_records import LoadConfig, PolicySpec, RequestRecord, RunResult, Timeline, _records, _Sender

ENGINE_KEYS = ("used", "reserved_pages", "drafter_pages", "refiner_pages", "num_requests_running",
               "num_requests_waiting", "num_pages", "page_bytes", "peak_used", "num_preemptions", "num_steps")


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


