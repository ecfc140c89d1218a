"""The scheduler's job table: per-job result queues with exactly-once delivery.

A request may run twice (its worker died after finishing it but before the result was read,
or a failed call had in fact run), so results are deduplicated by ``(job_id, request_id)``:
the first one wins, later ones are counted and dropped. Each result sits in its job's queue
until a client fetches it; a finished job whose results were all fetched shrinks to its
counts, so a long-lived scheduler does not keep every request id it ever served.

Plain Python with no Ray and no locking: the ``Scheduler`` calls it under its own lock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

from engine.request import REQUEST_FIELDS, ImageRequest, ImageResult, RecordError

RETIRED_JOBS_KEPT = 10_000  # finished jobs whose counts job_status still answers


@dataclass
class Item:
    """One request as the scheduler tracks it, across attempts."""

    job_id: str
    request: ImageRequest  # job_id set: what the worker runs, as it is
    demand: int  # KV pages its worker reserves (the engine's own demand function)
    t_submitted: float
    t_queued: float
    attempts: int = 0
    worker: str | None = None
    t_sent: float = 0.0
    failures: list[str] = field(default_factory=list)
    record: int = 0  # index of the job record it came from

    @property
    def key(self) -> str:
        """Unique within a scheduler: what workers know the request by."""
        return f"{self.job_id}/{self.request.request_id}"


@dataclass
class Job:
    job_id: str
    name: str
    total: int
    t_submitted: float
    results: deque = field(default_factory=deque)  # finished, not yet fetched by the client
    done: set = field(default_factory=set)  # request ids that have their one result
    num_errors: int = 0
    delivered: int = 0
    t_done: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.done) >= self.total

    def summary(self) -> dict:
        return {"job_id": self.job_id, "name": self.name, "total": self.total, "finished": len(self.done),
                "errors": self.num_errors, "delivered": self.delivered, "pending_fetch": len(self.results),
                "done": self.finished, "seconds": round((self.t_done or time.monotonic()) - self.t_submitted, 3)}


class JobTable:
    """Jobs by id, their undelivered results, and counters for status."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.retired: dict[str, dict] = {}  # job id -> counts, oldest first
        self.counters = {"results": 0, "errors": 0, "duplicates_dropped": 0}

    def create(self, job_id: str, name: str, total: int) -> Job:
        if job_id in self.jobs or job_id in self.retired:
            raise ValueError(f"job_id: {job_id!r} is already in use")
        job = Job(job_id=job_id, name=name, total=total, t_submitted=time.monotonic())
        self.jobs[job_id] = job
        return job

    def has_result(self, job_id: str, request_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is None or request_id in job.done

    def add_error(self, job: Job, err: RecordError) -> None:
        """A record answered without running (malformed, duplicate id). ``validate_records``
        gives error results ids that no request holds; the guard keeps that true here too."""
        if err.request_id in job.done:
            err = replace(err, request_id=f"#{err.record}")
        job.done.add(err.request_id)
        job.results.append(err.result(job.job_id).to_record())
        job.num_errors += 1
        self.counters["errors"] += 1
        self.counters["results"] += 1
        self._maybe_done(job)

    def add_result(self, job_id: str, request_id: str, res: dict | None, item: Item | None,
                   error: str | None = None) -> bool:
        """Record a worker's result (or an error the scheduler decided); False if it was a
        duplicate or its job is gone. Every result is an ``ImageResult.to_record`` dict."""
        job = self.jobs.get(job_id)
        if job is None or request_id in job.done:
            if job is not None or job_id in self.retired:  # a late second run of the request
                self.counters["duplicates_dropped"] += 1
            return False
        job.done.add(request_id)
        req = item.request if item is not None else None
        if res is None or error is not None:  # decided by the scheduler: no worker result
            head = (error or "").split(":", 1)[0]
            res = ImageResult(request_id, req.class_label if req else None, req.seed if req else None,
                              error=error, fields=(head,) if head in REQUEST_FIELDS else ()).to_record()
        rec = {k: v for k, v in res.items() if k != "key"}  # the worker's routing key stays internal
        rec.update(job_id=job_id, request_id=request_id)
        stats = dict(rec.get("stats") or {})
        if item is not None:
            rec["record"] = item.record
            stats.update(attempts=item.attempts, scheduler_queue_seconds=round(item.t_sent - item.t_queued, 6),
                         scheduler_total_seconds=round(time.monotonic() - item.t_submitted, 6))
        rec["stats"] = stats
        job.results.append(rec)
        error = rec.get("error")
        if error is not None:
            job.num_errors += 1
            self.counters["errors"] += 1
        self.counters["results"] += 1
        self._maybe_done(job)
        return True

    def add_preview(self, job_id: str, request_id: str, preview: dict) -> bool:
        """Queue a running request's preview (``{"preview": True, "scale", "png"}``) for the
        client: handed out like a result but not one (the request is not done). Dropped once
        the request has its result or the job is gone."""
        job = self.jobs.get(job_id)
        if job is None or request_id in job.done:
            return False
        rec = {k: v for k, v in preview.items() if k != "key"}
        rec.update(job_id=job_id, request_id=request_id, preview=True)
        job.results.append(rec)
        return True

    def take(self, job: Job, max_results: int) -> dict:
        """Hand out up to ``max_results`` results, once each; retire the job when it is done."""
        out = [job.results.popleft() for _ in range(min(max_results, len(job.results)))]
        job.delivered += sum(1 for r in out if not r.get("preview"))
        done = job.finished and not job.results
        if done:
            self._retire(job)
        return {"job_id": job.job_id, "results": out, "done": done, "total": job.total,
                "finished": len(job.done), "delivered": job.delivered, "errors": job.num_errors}

    def retired_status(self, job_id: str) -> dict | None:
        counts = self.retired.get(job_id)
        return None if counts is None else {"job_id": job_id, "done": True, **counts}

    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.finished or j.results]

    def __len__(self) -> int:
        return len(self.jobs) + len(self.retired)

    def _maybe_done(self, job: Job) -> None:
        if job.finished and job.t_done is None:
            job.t_done = time.monotonic()

    def _retire(self, job: Job) -> None:
        del self.jobs[job.job_id]
        self.retired[job.job_id] = {"total": job.total, "finished": len(job.done), "delivered": job.delivered,
                                    "errors": job.num_errors}
        while len(self.retired) > RETIRED_JOBS_KEPT:
            self.retired.pop(next(iter(self.retired)))
