"""The scheduler's dispatch loop: every call to the workers, and what their answers do.

One background thread sends batches (``submit``), keeps one long poll (``poll``) outstanding per
live worker, probes workers that failed (``hello``), and turns what comes back into results,
requeues and worker state (see ``scheduler.py`` for the fault model). ``DispatchLoop`` is a mixin
of ``Scheduler``: it works on the scheduler's queue, worker records and job table under the
scheduler's lock; the client-facing API stays in ``scheduler.py``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .jobs import Item
from .routing import WorkerView, fits_any_when_empty, route

log = logging.getLogger("scheduler.scheduler")

JANITOR_S = 5.0  # how often finished results past their retention are evicted
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

TICK_S = 0.02  # longest the dispatch loop sleeps before looking at the queue again
PROBE_RETRY_S = 1.0  # wait between probes of a worker that is restarting
CALL_TIMEOUT_S = 60.0  # synchronous calls to a worker from client threads (fresh stats, cancel)
RESTORE_WAIT_S = 30.0  # a restarted scheduler waits this long for workers' hello before requeueing


@dataclass
class _WorkerRec:
    name: str
    handle: Any
    state: str = "starting"  # starting | alive | suspect | dead
    incarnation: str | None = None
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    in_flight: dict = field(default_factory=dict)  # key -> Item (insertion ordered)
    reserved_pages: int = 0
    restarts: int = 0
    error: str | None = None
    poll_ref: Any = None
    ack: int = 0  # last result number stored: the next poll acknowledges it
    probe_ref: Any = None
    next_probe: float = 0.0
    since: float = field(default_factory=time.monotonic)


def _short(err: BaseException) -> str:
    """One line for status and logs. A worker whose constructor raised (bad checkpoint path ...)
    reports the root cause, the last line of the remote traceback, not Ray's generic headline."""
    lines = [ln for ln in _ANSI_RE.sub("", str(err)).strip().splitlines() if ln.strip()]
    if getattr(err, "actor_init_failed", False) and lines:
        return f"worker failed to start: {lines[-1].strip()}"[:400]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]


class DispatchLoop:
    """The worker-facing half of ``Scheduler`` (a mixin: see the module docstring)."""

    # ----- dispatch loop ------------------------------------------------------------------
    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                self._dispatch()
                self._ensure_calls()
                with self._lock:
                    refs = list(self._calls)
                if not refs:
                    time.sleep(TICK_S)
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=TICK_S)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    self._handle(ref)
                self._check_timeouts()
                self._janitor()
                self._metrics.update(len(self._queue), self.counters["requeued"])
            except Exception:  # keep serving: a bug in one tick must not strand every job
                log.exception("scheduler dispatch loop error")
                time.sleep(0.1)

    def _dispatch(self) -> None:
        """Route the queue's head to workers and send each worker its batch (one call each)."""
        with self._lock:
            if not self._queue:
                return
            if self._restoring_until:  # a restarted scheduler: let every worker say what it still holds
                if time.monotonic() < self._restoring_until and \
                        any(w.state == "starting" for w in self._workers.values()):
                    return
                self._restoring_until = 0.0
            live = [w for w in self._workers.values() if w.state == "alive"]
            if not live:
                if self._workers and all(w.state == "dead" for w in self._workers.values()):
                    why = "; ".join(f"{w.name}: {w.error}" for w in self._workers.values())
                    while self._queue:
                        it = self._queue.popleft()
                        self._result(it.job_id, it.request.request_id, None, it, error=f"no live worker ({why})")
                return
            views = [WorkerView(w.name, w.info["num_pages"], w.reserved_pages, len(w.in_flight),
                                self.config.max_inflight_per_worker or w.info.get("max_running", 64)) for w in live]
            head = self._queue[0]
            if not fits_any_when_empty(views, head.demand):  # sized at submit, so only a smaller restart
                self._queue.popleft()
                self._result(head.job_id, head.request.request_id, None, head,
                              error=f"kv_budget: request needs {head.demand} KV pages, more than any worker's pool")
                return
            assigned = route(self._queue, views, lambda it: it.demand)
            now = time.monotonic()
            batches: dict[str, list[Item]] = {}
            for item, view in assigned:
                self._queue.popleft()
                w = self._workers[view.name]
                w.in_flight[item.key] = item
                w.reserved_pages += item.demand
                item.attempts += 1
                item.worker = w.name
                item.t_sent = now
                batches.setdefault(w.name, []).append(item)
            for name, items in batches.items():  # .remote() only enqueues: cheap enough under the lock
                w = self._workers[name]
                payload = [it.request for it in items]  # ImageRequest objects: plain fields, pickled
                self._calls[w.handle.submit.remote(payload, w.incarnation)] = ("submit", w.name, w.incarnation, items)

    def _ensure_calls(self) -> None:
        now = time.monotonic()
        with self._lock:
            for w in self._workers.values():
                if w.state == "alive" and w.poll_ref is None:
                    w.poll_ref = w.handle.poll.remote(self.config.poll_wait_s, w.ack)
                    self._calls[w.poll_ref] = ("poll", w.name, w.incarnation, None)
                elif w.state in ("starting", "suspect") and w.probe_ref is None and now >= w.next_probe:
                    w.probe_ref = w.handle.hello.remote()
                    self._calls[w.probe_ref] = ("hello", w.name, w.incarnation, None)

    def _handle(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError

        with self._lock:
            kind, name, inc, items = self._calls.pop(ref)
        try:
            value = ray.get(ref)
        except RayActorError as e:
            with self._cv:
                self._on_failure(self._workers[name], ref, kind, inc, e)
            return
        except Exception as e:  # an exception inside a worker method: a bug, not a dead process
            log.error("worker %s %s raised: %s", name, kind, _short(e))
            with self._cv:
                w = self._workers[name]
                if kind == "poll" and w.poll_ref == ref:
                    w.poll_ref = None
                elif kind == "hello" and w.probe_ref == ref:
                    w.probe_ref, w.state, w.error = None, "dead", f"hello failed: {_short(e)}"
                    self._requeue_all(w, w.error)
                elif kind == "submit":
                    self._requeue_items(w, items or [], f"submit failed: {_short(e)}")
            return
        with self._cv:
            w = self._workers[name]
            if kind == "poll":
                if w.poll_ref == ref:
                    w.poll_ref = None
                self._on_poll(w, value)
            elif kind == "submit":
                if value.get("stale") and inc == w.incarnation and w.state == "alive":
                    self._mark_suspect(w, f"worker restarted (incarnation {value.get('incarnation')})")
            elif kind == "hello":
                if w.probe_ref == ref:
                    w.probe_ref = None
                self._on_hello(w, value)

    def _on_failure(self, w: _WorkerRec, ref: Any, kind: str, inc: str | None, err: Exception) -> None:
        from ray.exceptions import ActorDiedError

        if kind == "hello":
            if w.probe_ref == ref:
                w.probe_ref = None
            if isinstance(err, ActorDiedError):
                w.state, w.error = "dead", _short(err)
                self._requeue_all(w, w.error)
                log.warning("worker %s is dead: %s", w.name, w.error)
            else:
                w.next_probe = time.monotonic() + PROBE_RETRY_S
            self._cv.notify_all()
            return
        if kind == "poll" and w.poll_ref == ref:
            w.poll_ref = None
        if inc != w.incarnation or w.state != "alive":
            return  # a call to an incarnation already written off
        self._mark_suspect(w, _short(err))

    def _mark_suspect(self, w: _WorkerRec, why: str) -> None:
        """The worker's process may be gone: requeue its work now, probe it next tick."""
        w.state, w.error, w.since, w.next_probe = "suspect", why, time.monotonic(), 0.0
        self.counters["worker_failures"] += 1
        log.warning("worker %s failed (%s): requeueing %d request(s)", w.name, why, len(w.in_flight))
        self._requeue_all(w, why)
        self._cv.notify_all()

    def _requeue_all(self, w: _WorkerRec, why: str) -> None:
        items = list(w.in_flight.values())
        w.in_flight.clear()
        w.reserved_pages = 0
        self._requeue_items(w, items, why)

    def _requeue_items(self, w: _WorkerRec, items: list[Item], why: str) -> None:
        now = time.monotonic()
        for it in reversed(items):  # back to the front, in their original order
            if w.in_flight.pop(it.key, None) is not None:
                w.reserved_pages -= it.demand
            if self._jobs.has_result(it.job_id, it.request.request_id):
                continue  # already answered (a duplicate run) or its job is gone
            it.failures.append(f"{w.name}: {why}")
            if it.attempts >= self.config.max_attempts:
                self._result(it.job_id, it.request.request_id, None, it,
                              error=f"request failed {it.attempts} time(s) because its worker died "
                                    f"({'; '.join(it.failures)})")
                continue
            it.worker, it.t_queued = None, now
            self._queue.appendleft(it)
            self.counters["requeued"] += 1

    def _on_hello(self, w: _WorkerRec, info: dict) -> None:
        new = info["incarnation"]
        if w.incarnation is not None and new != w.incarnation:
            w.restarts += 1
            self._requeue_all(w, "worker restarted")
            log.warning("worker %s restarted (incarnation %s -> %s), registered with an empty pool",
                        w.name, w.incarnation, new)
        if new != w.incarnation:
            w.ack = 0
        if w.incarnation is None:
            self._reclaim(w, set(info.get("held_keys") or ()))
        w.incarnation, w.info, w.stats = new, info, info.get("stats", {})
        w.state, w.error, w.since = "alive", None, time.monotonic()
        if self._model_info is None:
            self._model_info = {k: info.get(k) for k in ("model", "kind", "resolutions", "num_classes",
                                                         "class_names", "num_scales",
                                                         "block_size", "page_bytes", "num_pages", "default_policy",
                                                         "default_kv_budget")}
        self._cv.notify_all()

    def _reclaim(self, w: _WorkerRec, held: set[str]) -> None:
        """First contact with a worker: queued requests it already holds (a previous scheduler
        incarnation sent them) stay there, in flight, instead of running twice."""
        if not held or not self._queue:
            return
        keep = deque()
        now = time.monotonic()
        for it in self._queue:
            if it.key in held:
                w.in_flight[it.key] = it
                w.reserved_pages += it.demand
                it.worker, it.t_sent = w.name, now
                it.attempts = max(it.attempts, 1)
                self.counters["reclaimed"] += 1
            else:
                keep.append(it)
        self._queue = keep

    def _janitor(self) -> None:
        now = time.monotonic()
        if now < self._next_janitor:
            return
        self._next_janitor = now + JANITOR_S
        with self._lock:
            gone = self._jobs.store.evict(self.config.collected_retention_s, self.config.retention_s)
            self.counters["evicted_jobs"] += len(gone)
        if gone:
            log.info("evicted the results of %d finished job(s)", len(gone))

    def _on_poll(self, w: _WorkerRec, value: dict) -> None:
        same = value["incarnation"] == w.incarnation
        if not same and w.state == "alive":
            self._mark_suspect(w, f"worker restarted (incarnation {value['incarnation']})")
        for res in value["results"]:
            key = res.get("key", "")
            if res.get("preview"):  # a running request's preview: not its result, it stays in flight
                job_id, _, request_id = key.partition("/")
                if self._jobs.add_preview(job_id, request_id, res):
                    self._cv.notify_all()
                continue
            item = w.in_flight.pop(key, None) if same else None
            if item is not None:
                w.reserved_pages -= item.demand
            job_id, _, request_id = key.partition("/")
            self._result(job_id, request_id, res, item)
        if same:
            w.stats = value["stats"]
            w.ack = max(w.ack, int(value.get("last") or 0))  # stored above: the next poll acknowledges

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._cv:
            for w in self._workers.values():
                if w.state in ("starting", "suspect") and now - w.since > self.config.worker_start_timeout_s:
                    w.state = "dead"
                    w.error = (f"not up after {self.config.worker_start_timeout_s:.0f}s "
                               f"(last: {w.error or 'starting'}; enough CPU/GPU in the Ray cluster?)")
                    self._requeue_all(w, w.error)
                    self._cv.notify_all()

