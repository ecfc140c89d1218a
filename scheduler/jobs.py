"""The scheduler's job table: exactly-once results over the durable ``JobStore``.

A request may run twice (its worker died after finishing it but before the result was read,
a failed call had in fact run, or the scheduler restarted and requeued work a worker still
held), so results are deduplicated by ``(job_id, request_id)``: the first one wins, later ones
are counted and dropped. Results go to the store (``store.py``) as they arrive; memory holds
only each unfinished job's counts and the ids that have their result, so a long-lived
scheduler holds no images and no finished jobs.

Plain Python with no Ray and no locking: the ``Scheduler`` calls it under its own lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from engine.request import REQUEST_FIELDS, ImageRequest, ImageResult, RecordError

from .store import JobStore


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
    """An unfinished job as the scheduler tracks it in memory (the store has the rest)."""

    job_id: str
    name: str
    total: int
    t_submitted: float  # time.time()
    done: set = field(default_factory=set)  # request ids that have their one result
    num_errors: int = 0
    state: str = "active"  # active | cancelled
    cursor: int = 0  # results handed out by get_results calls that pass no cursor
    previews: list = field(default_factory=list)  # live previews not yet handed out (memory only)

    @property
    def finished(self) -> bool:
        return len(self.done) >= self.total


def summary(row: dict) -> dict:
    """A job as status/list/get_results report it, from its store row."""
    end = row["t_done"] if row["finished"] >= row["total"] and row["t_done"] else time.time()
    return {"job_id": row["job_id"], "name": row["name"], "total": row["total"], "finished": row["finished"],
            "errors": row["errors"], "done": row["finished"] >= row["total"], "state": row["state"],
            "collected": row["collected_at"] is not None, "evicted": row["evicted_at"] is not None,
            "cancel": row["cancel_info"], "created": row["created"], "seconds": round(end - row["created"], 3)}


class JobTable:
    """Unfinished jobs by id, their result dedup, and counters for status."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.jobs: dict[str, Job] = {}
        self.counters = {"results": 0, "errors": 0, "duplicates_dropped": 0}
        self._default_cursor: dict[str, int] = {}  # finished jobs read without a cursor

    def create(self, job_id: str, name: str, total: int, requests: list[tuple[str, int, str, int]],
               errors: list[RecordError] = ()) -> Job:
        """Persist a job, its runnable requests ``(request_id, record, body_json, demand)`` and
        the error results of its bad records, in one transaction."""
        if job_id in self.jobs:
            raise ValueError(f"job_id: {job_id!r} is already in use")
        taken = {r[0] for r in requests}
        recs = []
        for err in errors:
            if err.request_id in taken:  # validate_records never does this; keep it true here too
                err = replace(err, request_id=f"#{err.record}")
            taken.add(err.request_id)
            recs.append((err.request_id, err.result(job_id).to_record()))
        self.store.create_job(job_id, name, total, requests, recs)
        job = Job(job_id=job_id, name=name, total=total, t_submitted=time.time(), done={r for r, _ in recs},
                  num_errors=len(recs))
        self.counters["results"] += len(recs)
        self.counters["errors"] += len(recs)
        self.jobs[job_id] = job
        if job.finished:
            del self.jobs[job_id]
        return job

    def restore(self) -> list[tuple[str, str, int, str, int]]:
        """After a scheduler restart: reload unfinished jobs; returns their pending requests."""
        for row in self.store.unfinished_jobs():
            self.jobs[row["job_id"]] = Job(row["job_id"], row["name"], row["total"], row["created"],
                                           done=self.store.done_ids(row["job_id"]), num_errors=row["errors"],
                                           state=row["state"])
        return self.store.pending()

    def has_result(self, job_id: str, request_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is None or request_id in job.done

    def add_result(self, job_id: str, request_id: str, res: dict | None, item: Item | None,
                   error: str | None = None) -> bool:
        """Record a worker's result (or an error the scheduler decided); False if it was a
        duplicate or its job is gone. Every result is an ``ImageResult.to_record`` dict."""
        job = self.jobs.get(job_id)
        if job is None or request_id in job.done:
            self.counters["duplicates_dropped"] += 1
            return False
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
            stats.update(attempts=item.attempts,
                         scheduler_queue_seconds=round(max(0.0, item.t_sent - item.t_queued), 6),
                         scheduler_total_seconds=round(time.time() - item.t_submitted, 6))
        rec["stats"] = stats
        return self._store(job, request_id, rec)

    def _store(self, job: Job, request_id: str, rec: dict) -> bool:
        if not self.store.add_result(job.job_id, request_id, rec):
            self.counters["duplicates_dropped"] += 1
            job.done.add(request_id)
            return False
        job.done.add(request_id)
        if rec.get("error") is not None:
            job.num_errors += 1
            self.counters["errors"] += 1
        self.counters["results"] += 1
        if job.finished:  # everything is in the store now: nothing left to track in memory
            del self.jobs[job.job_id]
        return True

    def add_preview(self, job_id: str, request_id: str, preview: dict) -> bool:
        """Queue a running request's preview (``{"preview": True, "scale", "png"}``) for the
        client: handed out with the results but not one (the request is not done) and never
        stored (a preview is only worth something live). Dropped once the request has its
        result or the job is gone."""
        job = self.jobs.get(job_id)
        if job is None or request_id in job.done:
            return False
        rec = {k: v for k, v in preview.items() if k != "key"}
        rec.update(job_id=job_id, request_id=request_id, preview=True)
        job.previews.append(rec)
        return True

    def take(self, job_id: str, after: int | None, max_results: int) -> dict:
        """Results of the job after cursor ``after`` (None: after the last ones handed out
        without a cursor, so each is handed out once). ``done``: nothing more will come."""
        row = self.store.job(job_id)
        if row is None:
            raise ValueError(f"job_id: unknown job {job_id!r}")
        if row["evicted_at"] is not None:
            raise LookupError(f"job_id: the results of job {job_id!r} were collected and evicted")
        job = self.jobs.get(job_id)
        start = (job.cursor if job is not None else self._default_cursor.get(job_id, 0)) if after is None else after
        got = self.store.results_after(job_id, start, max_results)
        cursor = got[-1][0] if got else start
        if after is None:
            if job is not None:
                job.cursor = cursor
            else:
                self._default_cursor[job_id] = cursor
        finished = row["finished"] >= row["total"]
        done = finished and cursor >= self.store.last_seq(job_id)
        if done:
            self.store.mark_collected(job_id)
            self._default_cursor.pop(job_id, None)
        previews = []
        if job is not None and job.previews:
            previews, job.previews = job.previews, []
        return {"job_id": job_id, "results": previews + [r for _, r in got], "cursor": cursor, "done": done,
                "total": row["total"], "finished": row["finished"], "errors": row["errors"], "state": row["state"]}

    def active(self) -> list[Job]:
        return list(self.jobs.values())

    def __len__(self) -> int:
        return self.store.counts()["jobs_stored"]
