"""``Scheduler``: the cluster's single front door, a named, detached Ray actor.

It validates jobs, keeps the request queue, routes each request to a worker by free KV pages
(``routing.py``), tracks what is in flight on every worker, and hands results back to clients
as they finish (pull: ``get_results(job_id, max_wait)``).

One background thread (the dispatch loop) makes every call to the workers: it sends batches
(``submit``), keeps one long poll (``poll``) outstanding per live worker, and probes workers
that failed (``hello``). Client calls (``submit_job``, ``get_results``, ``status``) run on the
actor's other threads and only touch the queue and job tables under ``_lock``. So a slow client
never stalls dispatch, and dispatch never waits for a slow worker: it waits on all outstanding
calls at once with ``ray.wait``.

Fault tolerance. Any ``RayActorError`` from a worker call means its process may be gone: every
request in flight there goes back to the front of the queue (requests are seeded, so a rerun
gives the same image) and the worker is probed with ``hello``. A new incarnation id in the
answer means Ray restarted it (fresh, empty pool): it re-registers and takes new work.
``ActorDiedError`` on the probe means it is gone for good. Results are deduplicated by
``(job_id, request_id)``, so a request that ran twice (a call that failed after it ran) is
returned once (``jobs.JobTable``). A request whose worker died ``max_attempts`` times ends with an error rather than
taking down every worker in turn.

Durable jobs. Every accepted job, its requests and every result go to the ``JobStore``
(SQLite + a results folder, ``store.py``) as they happen; memory holds only the queue, what is
in flight, and per-job dedup sets. With ``SchedulerConfig.store_dir`` the actor is restartable
(``scheduler_max_restarts``), pinned to its node (where the store is), and its workers are
detached, so they and their work outlive it. A restarted scheduler reloads unfinished jobs,
finds its workers by name, and holds dispatch until each has answered ``hello``: a pending
request whose key a worker still holds (running, or finished and not yet acknowledged) is
reclaimed there, the rest are queued again. Workers keep results until a poll acknowledges
them (``Worker.poll(ack=...)``), so nothing a dead scheduler read but did not store is lost;
the dedup drops what arrives twice. Clients read results by cursor (``get_results(after=)``)
and retry calls while the actor restarts (``client.py``).

Results leave the scheduler's disk once collected: a job whose results a client has read to
the end is evicted after ``collected_retention_s``, one never collected after ``retention_s``.
``cancel_job`` drops a job's queued requests and has its workers abort the running ones,
returning their pages at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import replace
from typing import Any

from engine.request import FieldError, ImageRequest, RecordError

from .config import SchedulerConfig
from .demand import DemandCalculator
from .dispatch import CALL_TIMEOUT_S, PROBE_RETRY_S, RESTORE_WAIT_S, TICK_S, DispatchLoop, _short, _WorkerRec  # noqa: F401
from .jobs import Item, JobTable, summary
from .metrics import SchedulerMetrics
from .store import JobStore
from .wire import RawRecord, validate_job

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Scheduler(DispatchLoop):
    """Queue, router and result store of a scalekv cluster. See the module docstring."""

    def __init__(self, config: SchedulerConfig, spawn: bool = True) -> None:
        self.config = config
        self.started_at = time.time()
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)  # results, worker state changes
        self._queue: deque[Item] = deque()
        self._ephemeral = config.store_dir is None
        self.store_dir = tempfile.mkdtemp(prefix="scalekv-store-") if self._ephemeral else config.store_dir
        self._jobs = JobTable(JobStore(self.store_dir))
        self._workers: dict[str, _WorkerRec] = {}
        self._calls: dict[Any, tuple[str, str, str | None, list[Item] | None]] = {}  # outstanding worker calls
        self._demand = DemandCalculator(config.worker.model, config.worker.engine)
        self._model_info: dict | None = None
        self._stop = threading.Event()
        self.restarted = _was_restarted()
        self.counters = {"requests": 0, "requeued": 0, "worker_failures": 0, "reclaimed": 0, "restored": 0,
                         "cancelled": 0, "evicted_jobs": 0}
        self._metrics = SchedulerMetrics(config.name)
        self._restoring_until = 0.0
        self._next_janitor = 0.0
        self._restore()
        if spawn:
            self._spawn_workers(reuse=self.restarted)
        self._thread = threading.Thread(target=self._loop, name="scalekv-dispatch", daemon=True)
        self._thread.start()
        if self.restarted:
            log.warning("scheduler %s restarted: %d unfinished job(s), %d pending request(s) restored from %s",
                        config.name, len(self._jobs.jobs), self.counters["restored"], self.store_dir)

    def _restore(self) -> None:
        """Queue the pending requests of unfinished jobs from the store (after a restart)."""
        now = time.monotonic()
        for job_id, _rid, record, body, demand in self._jobs.restore():
            job = self._jobs.jobs[job_id]
            req = ImageRequest.model_construct(**json.loads(body))
            self._queue.append(Item(job_id, req, demand, job.t_submitted, now, record=record))
        self.counters["restored"] = len(self._queue)
        if self._queue:
            self._restoring_until = now + RESTORE_WAIT_S

    # ----- workers ----------------------------------------------------------------------
    def _spawn_workers(self, reuse: bool = False) -> None:
        """Spawn the workers, or (``reuse``: a restarted scheduler) find the ones the previous
        incarnation spawned, by name, and spawn only those that are gone."""
        import ray

        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
        use_gpus = self.config.use_gpus if self.config.use_gpus is not None else gpus >= 1
        n = self.config.num_workers or (max(1, int(gpus)) if use_gpus else 1)
        wcfg = self.config.worker
        share = cpus / n
        if not use_gpus and wcfg.threads is None:
            wcfg = replace(wcfg, threads=max(1, int(share)))
        if not use_gpus and wcfg.device == "auto":
            wcfg = replace(wcfg, device="cpu")
        num_gpus = 1 if use_gpus else 0
        num_cpus = self.config.cpus_per_worker
        if num_cpus is None:
            num_cpus = float(int(share)) if share >= 1 else share
        avail = ray.available_resources()
        short = n * num_cpus > float(avail.get("CPU", 0)) + 1e-9 or n * num_gpus > float(avail.get("GPU", 0)) + 1e-9
        ns = self.config.namespace
        for i in range(n):
            name = f"{self.config.name}-worker-{i}"
            try:
                old = ray.get_actor(name, namespace=ns)
            except ValueError:
                old = None
            if old is not None and reuse:
                self._add_worker(name, old)
                continue
            if old is not None:  # left over from an earlier cluster of this name: never serve with it
                with contextlib.suppress(Exception):
                    ray.kill(old, no_restart=True)
                _wait_name_free(name, ns)
            from workers.worker import spawn_worker  # imports torch: a restart that reuses its workers skips it

            handle = spawn_worker(wcfg, name, num_gpus=num_gpus, num_cpus=0 if use_gpus else num_cpus,
                                  max_restarts=self.config.max_restarts, namespace=ns, detached=self.config.durable)
            self._add_worker(name, handle)
            if short and not reuse:  # Ray queues the actor until resources free up: say so in status and errors
                self._workers[name].error = (
                    f"may wait for resources: {n} worker(s) x {0 if use_gpus else num_cpus} CPU / {num_gpus} GPU, "
                    f"Ray has {avail.get('CPU', 0)} CPU / {avail.get('GPU', 0)} GPU free")

    def _add_worker(self, name: str, handle: Any) -> None:
        """Register a worker actor (spawned here, or by a test harness with ``spawn=False``)."""
        with self._lock:
            rec = _WorkerRec(name=name, handle=handle)
            self._workers[name] = rec

    def add_worker(self, name: str, handle: Any) -> bool:
        self._add_worker(name, handle)
        return True

    # ----- client API -------------------------------------------------------------------
    def wait_ready(self, timeout: float = 300.0) -> dict:
        """Block until no worker is still starting; raises RuntimeError if none came up."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(w.state == "starting" for w in self._workers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 1.0))
            alive = [w for w in self._workers.values() if w.state == "alive"]
            if not alive:
                errs = "; ".join(f"{w.name}: {w.error or w.state}" for w in self._workers.values())
                when = "" if all(w.state == "dead" for w in self._workers.values()) else f" within {timeout:.0f}s"
                raise RuntimeError(f"no worker came up{when} ({errs or 'no workers'})")
        return self.status()

    def submit_job(self, records: list[RawRecord | dict], name: str = "", job_id: str | None = None,
                   timeout: float = 300.0, exist_ok: bool = False) -> dict:
        """Validate ``records`` (decoded job file records or plain dicts), answer malformed ones
        at once with error results naming the field, and queue the rest (all in the store
        before this returns). Returns the job id and counts; fetch results with
        ``get_results``. ``exist_ok``: a job id already accepted returns that job's counts (a
        client retrying a submit whose answer it lost when the scheduler restarted)."""
        if job_id is None:
            job_id = uuid.uuid4().hex[:12]
        elif not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise ValueError(f"job_id: must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or "
                             f"digit, got {job_id[:80] if isinstance(job_id, str) else job_id!r}")
        if exist_ok:
            with self._lock:
                row = self._jobs.store.job(job_id)
            if row is not None:
                return {"job_id": job_id, "name": row["name"], "total": row["total"], "existing": True,
                        "queued": None, "rejected": None, "request_ids": None}
        info = self._wait_model_info(timeout)
        parsed = validate_job(records, info.get("class_names"), info["num_classes"], kind=info.get("kind") or "var",
                              resolutions=info.get("resolutions"))
        with self._lock:
            pages = max([w.info.get("num_pages", 0) for w in self._workers.values() if w.info] or [info["num_pages"]])
        demands = {k: self._demand.demand(k[0], k[1], info["block_size"], pages, *k[2:])
                   for k in {_demand_key(r) for r in parsed.requests}}
        now, wall = time.monotonic(), time.time()
        errors = list(parsed.errors)
        items, rows = [], []
        for r in parsed.requests:
            d = demands[_demand_key(r)]
            record = parsed.record_of[r.request_id]
            if "error" in d:
                why = FieldError(d["field"], d["error"].split(": ", 1)[-1])
                errors.append(RecordError(r.request_id, record, (why,)))
                continue
            req = r.model_copy(update={"job_id": job_id})
            items.append(Item(job_id, req, d["pages"], wall, now, record=record))
            rows.append((r.request_id, record, req.model_dump_json(), d["pages"]))
        with self._cv:
            self._jobs.create(job_id, name, parsed.total, rows, errors)
            self._queue.extend(items)
            self.counters["requests"] += parsed.total
            self._cv.notify_all()
        self._dispatch()  # send now rather than at the loop's next tick: saves up to TICK_S per job
        log.info("job %s: %d requests queued, %d rejected", job_id, len(items), parsed.total - len(items))
        ids = [r.request_id for r in parsed.requests] + [e.request_id for e in errors] \
            if parsed.total <= 100_000 else None
        return {"job_id": job_id, "name": name, "total": parsed.total, "queued": len(items),
                "rejected": parsed.total - len(items), "request_ids": ids}

    def get_results(self, job_id: str, max_wait: float = 1.0, max_results: int = 512,
                    after: int | None = None) -> dict:
        """Results of the job after cursor ``after`` (waits up to ``max_wait`` for the first);
        ``cursor`` in the answer is the next ``after``. ``after=None``: the results not yet
        handed out without a cursor, each once. ``done`` is True when the job has nothing
        more to give; a job read to the end is evicted after ``collected_retention_s``."""
        deadline = time.monotonic() + max(0.0, max_wait)
        with self._cv:
            while True:
                out = self._jobs.take(job_id, after, max_results)
                left = deadline - time.monotonic()
                if out["results"] or out["done"] or left <= 0:
                    return out
                self._cv.wait(min(left, 1.0))

    def get_results_multi(self, job_ids: list[str], max_wait: float = 1.0, max_results: int = 512) -> dict:
        """``get_results`` for several jobs at once (one long poll for every job an HTTP server
        waits on): waits up to ``max_wait`` until any of them has a result or is done, or another
        job is submitted (the caller may be about to wait on it too), then hands out what each
        has, each result once. A job id not submitted yet is left out (a server registers a job
        just before submitting it)."""
        deadline = time.monotonic() + max(0.0, max_wait)
        with self._cv:
            submitted = self.counters["requests"]
            while True:
                out = {}
                for j in job_ids:
                    if self._jobs.store.job(j) is None:
                        continue
                    try:
                        got = self._jobs.take(j, None, max_results)
                    except LookupError:  # collected and evicted: nothing more will come
                        got = {"job_id": j, "results": [], "done": True}
                    if got["results"] or got["done"]:
                        out[j] = got
                left = deadline - time.monotonic()
                if out or left <= 0 or self.counters["requests"] != submitted:
                    return out
                self._cv.wait(min(left, 1.0))

    def job_status(self, job_id: str) -> dict:
        with self._lock:
            row = self._jobs.store.job(job_id)
            if row is None:
                raise ValueError(f"job_id: unknown job {job_id!r}")
            out = summary(row)
            out["queued"] = sum(it.job_id == job_id for it in self._queue)
            out["in_flight"] = sum(it.job_id == job_id for w in self._workers.values() for it in w.in_flight.values())
            return out

    def list_jobs(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return [summary(r) for r in self._jobs.store.jobs(limit)]

    def cancel_job(self, job_id: str, reason: str = "cancelled") -> dict:
        """Drop the job's queued requests and abort its running ones on their workers, whose
        pages are free when this returns. Every unfinished request ends with an error result
        ``cancelled``. Returns what was removed and how many pages the workers freed."""
        import ray

        with self._cv:
            row = self._jobs.store.job(job_id)
            if row is None:
                raise ValueError(f"job_id: unknown job {job_id!r}")
            if row["finished"] >= row["total"]:
                return {"job_id": job_id, "already_done": True, "queued_removed": 0, "running_cancelled": 0,
                        "pages_freed": 0}
            queued = [it for it in self._queue if it.job_id == job_id]
            self._queue = deque(it for it in self._queue if it.job_id != job_id)
            running: dict[str, list[Item]] = {}
            for w in self._workers.values():
                mine = [it for it in w.in_flight.values() if it.job_id == job_id]
                if mine:
                    running[w.name] = mine
            for it in queued + [it for items in running.values() for it in items]:
                self._result(job_id, it.request.request_id, None, it, error=f"{reason} (job cancelled)")
            handles = {name: self._workers[name].handle for name in running}
            incs = {name: self._workers[name].incarnation for name in running}
        freed, per_worker = 0, {}
        refs = {name: h.cancel.remote([it.key for it in running[name]], f"{reason} (job cancelled)")
                for name, h in handles.items()}
        for name, ref in refs.items():
            try:
                got = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except Exception as e:  # its process is gone: the dispatch loop requeues nothing (all answered)
                per_worker[name] = {"error": _short(e)}
                continue
            per_worker[name] = got
            freed += got["pages_freed"]
        with self._cv:
            for name, items in running.items():
                w = self._workers[name]
                if w.incarnation != incs[name]:
                    continue
                for it in items:
                    if w.in_flight.pop(it.key, None) is not None:
                        w.reserved_pages -= it.demand
            info = {"queued_removed": len(queued), "running_cancelled": sum(len(v) for v in running.values()),
                    "pages_freed": freed, "workers": per_worker, "at": time.time()}
            self._jobs.store.set_cancelled(job_id, info)
            self.counters["cancelled"] += len(queued) + info["running_cancelled"]
            self._cv.notify_all()
        log.info("job %s cancelled: %s", job_id, info)
        return {"job_id": job_id, **info}

    def status(self, fresh: bool = False) -> dict:
        """Scheduler counters, queue depth and every worker's state and last stats. ``fresh``
        asks each live worker for its stats now instead of the last poll's snapshot."""
        if fresh:
            self._refresh_stats()
        with self._lock:
            workers = []
            for w in self._workers.values():
                workers.append({
                    "name": w.name, "state": w.state, "incarnation": w.incarnation, "restarts": w.restarts,
                    "error": w.error, "in_flight": len(w.in_flight), "reserved_pages": w.reserved_pages,
                    "num_pages": w.info.get("num_pages"), "device": w.info.get("device"),
                    "pid": w.info.get("pid"), "host": w.info.get("host"), "stats": w.stats,
                })
            active = [summary(r) for r in (self._jobs.store.job(j.job_id) for j in self._jobs.active()) if r]
            stored = self._jobs.store.counts()
            return {
                "scheduler": {
                    "name": self.config.name, "namespace": self.config.namespace,
                    "uptime_s": round(time.time() - self.started_at, 3), "restarted": self.restarted,
                    "store": None if self._ephemeral else self.store_dir,
                    "queue_depth": len(self._queue),
                    "in_flight": sum(len(w.in_flight) for w in self._workers.values()),
                    "jobs_total": stored["jobs_stored"], "jobs_active": len(active),
                    "results_stored": stored["results_stored"],
                    **self.counters, **self._jobs.counters,
                },
                "model": self._model_info,
                "workers": workers,
                "jobs": active,
            }

    def worker_handles(self) -> dict:
        with self._lock:
            return {w.name: w.handle for w in self._workers.values()}

    def shutdown(self, timeout: float = 30.0) -> dict:
        """Fail what is queued or in flight, stop the loop, drain and kill the workers."""
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        with self._cv:
            items = list(self._queue) + [it for w in self._workers.values() for it in w.in_flight.values()]
            self._queue.clear()
            for it in items:
                self._jobs.add_result(it.job_id, it.request.request_id, None, it, error="cluster stopped before it ran")
            self._cv.notify_all()
            for w in self._workers.values():
                w.in_flight.clear()
                w.reserved_pages = 0
            handles = {w.name: w.handle for w in self._workers.values() if w.state != "dead"}
        drains = {name: h.shutdown.remote() for name, h in handles.items()}
        stopped = {}
        for name, ref in drains.items():
            try:
                stopped[name] = ray.get(ref, timeout=timeout)["aborted"]
            except Exception as e:
                stopped[name] = _short(e)
            with contextlib.suppress(Exception):  # already gone
                ray.kill(handles[name], no_restart=True)
        with self._lock:
            for w in self._workers.values():
                w.state = "dead"
                w.error = "stopped"
            if self._ephemeral:
                self._jobs.store.close()
                shutil.rmtree(self.store_dir, ignore_errors=True)
        return {"workers_stopped": stopped, "failed_requests": len(items)}

    # ----- helpers for client calls -------------------------------------------------------
    def _wait_model_info(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._model_info is None:
                if all(w.state == "dead" for w in self._workers.values()):
                    raise RuntimeError("no live worker: " + "; ".join(f"{w.name}: {w.error}" for w in
                                                                       self._workers.values()))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no worker is ready after {timeout:.0f}s")
                self._cv.wait(min(left, 1.0))
            return self._model_info

    def _refresh_stats(self) -> None:
        import ray

        with self._lock:
            alive = [(w.name, w.handle) for w in self._workers.values() if w.state == "alive"]
        refs = {name: h.stats.remote() for name, h in alive}
        for name, ref in refs.items():
            try:
                s = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except Exception:
                continue  # the dispatch loop notices failures through its own calls
            with self._lock:
                w = self._workers[name]
                if s.get("incarnation") == w.incarnation:
                    w.stats = s

    def _result(self, job_id: str, request_id: str, res: dict | None, item: Item | None,
                error: str | None = None) -> None:
        """Record a result (deduplicated) and wake clients waiting in get_results. Holds _lock."""
        if self._jobs.add_result(job_id, request_id, res, item, error):
            self._cv.notify_all()


def _demand_key(r: ImageRequest) -> tuple:
    """What a request's page demand depends on: (policy, budget), plus (aspect ratio,
    resolution) for a text-to-image request."""
    if r.prompt is None:
        return (r.policy, r.kv_budget)
    return (r.policy, r.kv_budget, r.height_over_width, r.resolution)


def _was_restarted() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in an actor (tests build the class in-process)
        return False


def _wait_name_free(name: str, namespace: str, timeout: float = 10.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)


def start_scheduler(config: SchedulerConfig, detached: bool = True, runtime_env: dict | None = None):
    """Create the named scheduler actor in ``config.namespace`` (it spawns the workers).
    Detached so it outlives the process that started it (``scalekv cluster start`` exits).
    With a durable store it is restartable and pinned to this node, where the store is."""
    import ray

    durable = config.durable and detached
    opts = dict(name=config.name, namespace=config.namespace, max_concurrency=32, num_cpus=0,
                max_restarts=config.scheduler_max_restarts if durable else 0, max_task_retries=0)
    if durable:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                     soft=False)
    else:
        config = replace(config, scheduler_max_restarts=0)  # workers not detached: they die with it
    if detached:
        opts["lifetime"] = "detached"
    if runtime_env:
        opts["runtime_env"] = runtime_env
    return ray.remote(Scheduler).options(**opts).remote(config)
