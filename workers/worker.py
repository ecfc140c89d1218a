"""``Worker``: one model + KV pool + step loop, run as a Ray actor (one per GPU or CPU slot).

The worker owns an ``ImageEngine`` (model, ``KVPool``, ``MemoryManager``) and drives its step
loop on a background thread, so the actor's methods (``submit``, ``poll``, ``stats``) answer
while a step runs: the actor is threaded (``max_concurrency`` > 1) and the engine is touched by
the loop thread only, or under ``_engine_lock``. Only plain data crosses Ray: ``ImageRequest`` in,
``ImageResult.to_record`` (token ids, PNG bytes, stats) out. Tensors never leave the process (shipping KV or images as
torch tensors through the object store costs 10-100x more).

Fault model: Ray restarts a dead worker (``max_restarts``) by re-running the constructor, which
builds a fresh, empty pool and a new ``incarnation`` id. The scheduler compares incarnations to
learn that everything the old process held is gone, and requeues it; ``submit`` refuses
batches addressed to another incarnation so a request meant for the dead process is not
silently run twice. Calls are never retried by Ray (``max_task_retries=0``): a retried
``submit`` on a restarted actor would be a duplicate, and the scheduler already requeues.

Results are handed back at least once: ``poll(ack=n)`` keeps every result after ``n`` until a
later poll acknowledges it, so a scheduler that died between reading a poll and storing its
results (or a restarted scheduler, whose first poll acknowledges nothing) gets them again; the
scheduler's job table drops the second copy. A key stays in ``held_keys`` (``hello``) until its
result is acknowledged, which is how a restarted scheduler reclaims work still on a worker.

The class is plain Python so it can be unit-tested in-process; ``spawn_worker`` wraps it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque

from engine.api import make_engine
from engine.models.registry import build_model
from engine.request import ImageRequest, ImageResult
from memory.manager import RequestTooLargeError

from .config import WorkerConfig
from .telemetry import WorkerMetrics, device_memory, process_rss_bytes

log = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0  # an idle loop wakes this often to refresh its stats snapshot (RSS ...)
LATENCY_WINDOW = 512  # finished requests kept for the latency summary in stats()
ACTOR_MAX_CONCURRENCY = 8  # poll (blocking) + submit + stats + hello + pause at once, with headroom


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when this process may use a GPU (Ray set CUDA_VISIBLE_DEVICES for a
    ``num_gpus=1`` actor) and torch sees one, else 'cpu'. Resolved inside the actor, after Ray
    assigned the GPU: torch caches the device count on first use."""
    import torch

    if requested == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if requested == "cuda":
        if not has_cuda:
            raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return "cuda"
    return "cuda" if has_cuda else "cpu"


class Worker:
    """Model + engine + background step loop. Methods are the actor's remote API."""

    def __init__(self, config: WorkerConfig, name: str = "worker-0", metrics: bool = True) -> None:
        import torch

        self.config = config
        self.name = name
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        model = build_model(config.model, config.checkpoint, config.tokenizer, random_init=config.random_init,
                            device=self.device, seed=config.seed)
        self.engine = make_engine(model, config.engine)  # ImageEngine (VAR) or InfinityEngine
        self._engine_lock = threading.Lock()  # engine access from outside the loop thread
        self._lock = threading.Lock()  # inbox / outbox / flags
        self._work = threading.Condition(self._lock)  # new requests, resume, stop
        self._ready = threading.Condition(self._lock)  # new results for poll()
        self._inbox: list[ImageRequest] = []
        self._outbox: list[tuple[int, dict]] = []  # (number, result), kept until acknowledged
        self._out_seq = 0
        self._held: set[str] = set()  # keys accepted and not yet handed back by poll()
        self._paused = False
        self._stopped = False
        self._finished_total = 0
        self._errors_total = 0
        self._latency: deque[tuple[float, float | None]] = deque(maxlen=LATENCY_WINDOW)
        self._metrics = WorkerMetrics(name, enabled=metrics)
        self._snapshot = self._compute_stats()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True)
        self._thread.start()
        log.info("worker %s incarnation %s up on %s (%d threads)", name, self.incarnation, self.device,
                 torch.get_num_threads())

    # ----- remote API -------------------------------------------------------------------
    def hello(self) -> dict:
        """Identity, model facts the scheduler validates against, pool size and current stats.
        The scheduler calls it at start and after any failed call (re-registration)."""
        spec = self.engine.model.spec
        pool = self.engine.pool
        with self._lock:
            held = sorted(self._held)
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device,
            "model": spec.name,
            **self.engine.model_facts(),  # kind, num_classes, class_names, num_scales, resolutions
            "num_pages": pool.num_pages,
            "block_size": pool.block_size,
            "page_bytes": pool.page_bytes,
            "max_running": self.config.engine.max_running,
            "default_policy": self.config.engine.policy,
            "default_kv_budget": self.config.engine.kv_budget,
            "held_keys": held,
            "stats": self.stats(),
        }

    def page_demand(self, policy: str | None, kv_budget: float | None, h_div_w: float | None = None,
                    resolution: str | None = None) -> dict:
        """Pages one request with this policy and budget reserves: the same plan and demand
        function the engine's manager uses at admission (``MemoryManager.request_pages``).
        Text-to-image models also size by the request's aspect ratio and resolution (given only
        for them). Returns ``{"pages": n}`` or ``{"error": "policy: ..."}`` for a policy the
        engine rejects."""
        cfg = self.config.engine
        policy = cfg.policy if policy is None else policy
        kv_budget = cfg.kv_budget if kv_budget is None else kv_budget
        shape = {} if h_div_w is None and resolution is None else {"h_div_w": h_div_w or 1.0, "resolution": resolution}
        try:
            with self._engine_lock:
                plan = self.engine.plan_for(policy, kv_budget, **shape)
                pages = self.engine.manager.request_pages(plan)
                self.engine.manager.check_fits_pool(plan)
        except RequestTooLargeError as e:  # the per-request knob that can fix it is the budget
            return {"error": f"kv_budget: {e}", "field": "kv_budget"}
        except ValueError as e:  # unknown policy, a budget the policy refuses
            msg = str(e)
            field = msg.split(":", 1)[0] if ":" in msg.split(" ", 1)[0] else "policy"
            return {"error": msg if msg.startswith(f"{field}:") else f"{field}: {msg}", "field": field}
        return {"pages": int(pages), "policy": policy, "kv_budget": kv_budget}

    def submit(self, requests: list[ImageRequest], incarnation: str | None = None) -> dict:
        """Queue requests (``ImageRequest`` with ``job_id`` set; ``key`` = job/request). Refused
        as a whole if addressed to another incarnation; keys already held are not queued twice."""
        if incarnation is not None and incarnation != self.incarnation:
            return {"stale": True, "incarnation": self.incarnation, "accepted": 0, "duplicates": []}
        dups = []
        with self._lock:
            for r in requests:
                if r.key in self._held:
                    dups.append(r.key)
                    continue
                self._held.add(r.key)
                self._inbox.append(r)
            self._work.notify()
        return {"stale": False, "incarnation": self.incarnation, "accepted": len(requests) - len(dups),
                "duplicates": dups}

    def poll(self, max_wait: float = 0.2, ack: int | None = None) -> dict:
        """Finished results (waits up to ``max_wait`` seconds for the first), with a stats
        snapshot so the scheduler's view of the pool stays fresh without extra calls.
        ``ack=None``: each result is handed out once. ``ack=n``: results numbered <= n are
        dropped (the caller stored them) and every later one is returned, again if need be,
        until acknowledged; ``last`` is the number to acknowledge next."""
        deadline = time.monotonic() + max(0.0, max_wait)
        with self._lock:
            if ack is not None:
                self._drop_acked(ack)
            while not self._outbox and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            out = list(self._outbox)
            if ack is None:
                self._drop_acked(out[-1][0] if out else 0)
            snapshot = dict(self._snapshot, inbox=len(self._inbox), held=len(self._held))
        return {"incarnation": self.incarnation, "results": [r for _, r in out],
                "last": out[-1][0] if out else ack or 0, "stats": snapshot}

    def _drop_acked(self, ack: int) -> None:
        """Caller holds ``_lock``."""
        while self._outbox and self._outbox[0][0] <= ack:
            _, r = self._outbox.pop(0)
            if not r.get("preview"):  # a preview is not the request's result: it stays held
                self._held.discard(r["key"])

    def cancel(self, keys: list[str], reason: str = "cancelled") -> dict:
        """Abort these requests (``job/request`` keys) wherever they are: still in the inbox,
        waiting in the engine, or running; their pages go back to the pool now. Each aborted
        request comes back through ``poll`` as an error result. Returns how many were found
        and the pages they had reserved."""
        wanted = set(keys)
        found, pages = 0, 0
        with self._lock:
            keep = [r for r in self._inbox if r.key not in wanted]
            dropped = [r for r in self._inbox if r.key in wanted]
            self._inbox = keep
        results = [ImageResult(r.request_id, r.class_label, r.seed, job_id=r.job_id, error=reason) for r in dropped]
        found += len(dropped)
        with self._engine_lock:
            for key in wanted:
                got = self.engine.abort(key, reason)
                if got is not None:
                    results.append(got[0])
                    pages += got[1]
                    found += 1
            stats = self._compute_stats()
        out = [self._to_wire(r) for r in results]
        with self._lock:
            self._push(out)
            self._snapshot = stats
        return {"cancelled": found, "pages_freed": pages, "free_pages": stats["engine"].get("available_pages")}

    def _push(self, results: list[dict]) -> None:
        """Caller holds ``_lock``."""
        for r in results:
            self._out_seq += 1
            self._outbox.append((self._out_seq, r))
        if results:
            self._ready.notify_all()

    def stats(self) -> dict:
        """Fresh stats: pool, requests, memory, latency (waits for a running step to end)."""
        with self._engine_lock:
            s = self._compute_stats()
        with self._lock:
            s.update(inbox=len(self._inbox), held=len(self._held))
        return s

    def pause(self) -> bool:
        """Stop stepping; accepted requests stay queued or running and keep their pages.
        For maintenance and fault-injection tests (a worker paused with work in flight)."""
        with self._lock:
            self._paused = True
        return True

    def resume(self) -> bool:
        with self._lock:
            self._paused = False
            self._work.notify()
        return True

    def shutdown(self) -> dict:
        """Stop the loop, fail what is still queued or running, and return every page."""
        with self._lock:
            self._stopped = True
            self._work.notify_all()
            self._ready.notify_all()
        self._thread.join(timeout=30)
        with self._engine_lock:
            aborted = self.engine.abort_all("worker shut down")
            self.engine.manager.release_all()
            return {"aborted": len(aborted), "stats": self._compute_stats()}

    # ----- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._inbox and (self._paused or not self._busy()):
                    if not self._work.wait(IDLE_WAKE_S):
                        break  # idle wake: refresh the snapshot below
                if self._stopped:
                    return
                batch, self._inbox = self._inbox, []
                paused = self._paused
            with self._engine_lock:
                try:
                    for req in batch:
                        self.engine.add_request(req)  # bad input becomes an error result on the next step
                    results = [] if paused else self._step()
                except Exception as e:  # a bug outside the engine's own error handling: fail, keep serving
                    log.exception("worker %s: loop iteration failed", self.name)
                    results = self.engine.abort_all(f"worker {self.name} loop error: {type(e).__name__}: {e}")
                previews = self.engine.take_previews()
                stats = self._compute_stats()
            out = [_preview_to_wire(p) for p in previews] + [self._to_wire(r) for r in results]
            with self._lock:
                self._push(out)
                self._snapshot = stats
            self._metrics.update(stats)

    def _busy(self) -> bool:
        return self.engine.has_unfinished()

    def _step(self) -> list[ImageResult]:
        try:
            return self.engine.step()
        except Exception as e:  # the engine fails a broken batch itself; this is a bug beyond that
            log.exception("worker %s: step crashed", self.name)
            return self.engine.abort_all(f"worker {self.name} step crashed: {type(e).__name__}: {e}")

    def _to_wire(self, r: ImageResult) -> dict:
        """A finished request as it crosses back to the scheduler: ``ImageResult.to_record``
        with the image as PNG bytes, plus ``key`` and which worker ran it."""
        self._finished_total += 1
        out = r.to_record(png=r.png_bytes() if r.ok else None)
        out["key"] = f"{r.job_id}/{r.request_id}" if r.job_id else r.request_id
        out["stats"].update(worker=self.name, incarnation=self.incarnation)
        if r.ok:
            ttfs = r.stats.get("first_scale_seconds")
            self._latency.append((float(r.seconds), ttfs))
            self._metrics.observe(float(r.seconds), ttfs)
        else:
            self._errors_total += 1
        return out

    def _compute_stats(self) -> dict:
        """Caller holds ``_engine_lock`` (or is the loop thread). ``engine`` passes the engine's
        own stats through untouched, so keys added by other subsystems (per drafter/refiner
        role pool usage from compression) reach ``scalekv status`` without changes here."""
        lat = sorted(e for e, _ in self._latency)
        ttfs = [t for _, t in self._latency if t is not None]
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "device": self.device,
            "threads": _torch_threads(),
            "paused": self._paused,
            "uptime_s": round(time.time() - self.started_at, 3),
            "engine": self.engine.stats(),
            "metrics_enabled": self._metrics.enabled,
            "finished_total": self._finished_total,
            "errors_total": self._errors_total,
            "rss_bytes": process_rss_bytes(),
            "device_memory": device_memory(self.device),
            "latency": {
                "count": len(lat),
                "e2e_mean_s": sum(lat) / len(lat) if lat else None,
                "e2e_p50_s": lat[len(lat) // 2] if lat else None,
                "e2e_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
                "first_scale_mean_s": sum(ttfs) / len(ttfs) if ttfs else None,
            },
        }


def _preview_to_wire(p) -> dict:
    """A preview as it crosses to the scheduler: not a result (``preview`` marks it), so the
    request stays held and in flight; the image as PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(p.image).save(buf, format="PNG")
    return {"key": p.key, "preview": True, "job_id": p.job_id, "request_id": p.request_id, "scale": p.scale,
            "png": buf.getvalue()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def spawn_worker(config: WorkerConfig, name: str, *, num_gpus: float = 0, num_cpus: float = 1,
                 max_restarts: int = 3, namespace: str | None = None, detached: bool = False,
                 scheduling_strategy=None):
    """Start a ``Worker`` actor: one per GPU (``num_gpus=1``, no CPU reservation, as vLLM does)
    or one per CPU slot. Named, so ``scalekv status`` and tests can find it. ``detached``: the
    worker outlives the scheduler that spawned it (a restarted scheduler finds it by name)."""
    import ray

    opts = dict(name=name, max_restarts=max_restarts, max_task_retries=0, max_concurrency=ACTOR_MAX_CONCURRENCY,
                num_gpus=num_gpus, num_cpus=0 if num_gpus else num_cpus)
    if detached:
        opts["lifetime"] = "detached"
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    if namespace is not None:
        opts["namespace"] = namespace
    return ray.remote(Worker).options(**opts).remote(config, name)
