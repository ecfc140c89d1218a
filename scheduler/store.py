"""``JobStore``: the scheduler's durable job table, SQLite in one file plus a results folder.

What survives the scheduler actor (and ``scalekv cluster stop`` / ``start`` on the same state
directory): every accepted job, every request it expanded to (the ``ImageRequest`` as JSON and
its KV page demand), and every finished result. A result is one row (the ``ImageResult`` record
without its image, msgpack) and, for an image, one PNG file under ``results/<job_id>/``, written
when the result arrives, so the scheduler's memory never holds finished images.

Why SQLite: stdlib (no service to run), transactional (a job's requests are accepted all or
nothing; a result and its dedup key land together), one file in the cluster's state directory
on the head node, where the scheduler actor is pinned. Ray's GCS KV store was the other
candidate; it lives in the GCS process, so it dies with the local Ray instance unless GCS
fault tolerance (an external Redis) is set up, and holding PNG bytes there would make the GCS
the image store. Writes are not fsynced (``synchronous=NORMAL`` with WAL): the store survives
the scheduler process dying, which is the fault it exists for; a machine crash may lose the
last results, which then run again.

Exactly once: ``results`` has ``UNIQUE(job_id, request_id)``; ``add_result`` is an
``INSERT OR IGNORE`` and reports whether the row is new, so a request that ran twice (requeued
after a worker or the scheduler died) is stored and delivered once. Every result gets a global,
increasing ``seq``: clients read a job's results after a cursor (``results_after``), so a client
that reconnects, or a second ``scalekv wait``, sees the same results again in the same order.

Not thread-safe on its own: the ``Scheduler`` calls it under its lock.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import msgpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, total INTEGER NOT NULL, created REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',          -- active | cancelled
    finished INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    t_done REAL, collected_at REAL, evicted_at REAL, cancel_info TEXT);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, request_id TEXT NOT NULL,
    record INTEGER NOT NULL, body TEXT NOT NULL, demand INTEGER NOT NULL, UNIQUE (job_id, request_id));
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, request_id TEXT NOT NULL,
    ok INTEGER NOT NULL, rec BLOB NOT NULL, png TEXT, UNIQUE (job_id, request_id));
CREATE INDEX IF NOT EXISTS results_job ON results (job_id, seq);
"""

JOBS_KEPT = 10_000  # evicted jobs whose counts are still answered


class JobStore:
    """Jobs, their requests and results, on disk under ``root`` (``jobs.db``, ``results/``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.results_dir = self.root / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.root / "jobs.db"), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ----- jobs ---------------------------------------------------------------------------
    def create_job(self, job_id: str, name: str, total: int, requests: list[tuple[str, int, str, int]],
                   errors: list[tuple[str, dict]] = ()) -> None:
        """A job, its runnable requests ``(request_id, record, body_json, demand)`` and the
        error results of records that cannot run ``(request_id, record dict)``, all or nothing
        (a job restored after a crash is never missing its error results). Raises ValueError
        if the job id is taken."""
        with self._tx():
            if self.db.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone():
                raise ValueError(f"job_id: {job_id!r} is already in use")
            self.db.execute("INSERT INTO jobs (job_id, name, total, created) VALUES (?,?,?,?)",
                            (job_id, name, total, time.time()))
            self.db.executemany("INSERT INTO requests (job_id, request_id, record, body, demand) VALUES (?,?,?,?,?)",
                                [(job_id, *r) for r in requests])
            for request_id, rec in errors:
                self._insert_result(job_id, request_id, rec)

    def job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT job_id, name, total, created, state, finished, errors, t_done, collected_at, "
                              "evicted_at, cancel_info FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else _job_dict(row)

    def jobs(self, limit: int = 100) -> list[dict]:
        rows = self.db.execute("SELECT job_id, name, total, created, state, finished, errors, t_done, collected_at, "
                               "evicted_at, cancel_info FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job_dict(r) for r in rows]

    def unfinished_jobs(self) -> list[dict]:
        rows = self.db.execute("SELECT job_id, name, total, created, state, finished, errors, t_done, collected_at, "
                               "evicted_at, cancel_info FROM jobs WHERE finished < total ORDER BY created").fetchall()
        return [_job_dict(r) for r in rows]

    def done_ids(self, job_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT request_id FROM results WHERE job_id=?", (job_id,))}

    def pending(self, job_id: str | None = None) -> list[tuple[str, str, int, str, int]]:
        """Requests without a result, in submission order: ``(job_id, request_id, record, body, demand)``."""
        q = ("SELECT r.job_id, r.request_id, r.record, r.body, r.demand FROM requests r JOIN jobs j USING (job_id) "
             "WHERE j.finished < j.total AND NOT EXISTS (SELECT 1 FROM results s WHERE s.job_id=r.job_id AND "
             "s.request_id=r.request_id)")
        args: tuple = ()
        if job_id is not None:
            q += " AND r.job_id=?"
            args = (job_id,)
        return self.db.execute(q + " ORDER BY r.id", args).fetchall()

    def set_cancelled(self, job_id: str, info: dict) -> None:
        self.db.execute("UPDATE jobs SET state='cancelled', cancel_info=? WHERE job_id=?", (json.dumps(info), job_id))

    # ----- results ------------------------------------------------------------------------
    def add_result(self, job_id: str, request_id: str, rec: dict) -> bool:
        """Store one result (``ImageResult.to_record`` dict, PNG bytes in ``rec["png"]``) once;
        False if (job_id, request_id) already has one or the job is unknown/evicted."""
        job = self.db.execute("SELECT evicted_at FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if job is None or job[0] is not None:
            return False
        if self.db.execute("SELECT 1 FROM results WHERE job_id=? AND request_id=?", (job_id, request_id)).fetchone():
            return False
        with self._tx():
            return self._insert_result(job_id, request_id, rec)

    def _insert_result(self, job_id: str, request_id: str, rec: dict) -> bool:
        """Inside a transaction."""
        png = rec.get("png")
        body = {k: v for k, v in rec.items() if k != "png"}
        ok = bool(rec.get("ok")) and rec.get("error") is None
        cur = self.db.execute("INSERT OR IGNORE INTO results (job_id, request_id, ok, rec) VALUES (?,?,?,?)",
                              (job_id, request_id, int(ok), msgpack.packb(body, use_bin_type=True, default=str)))
        if cur.rowcount == 0:
            return False
        seq = cur.lastrowid
        if isinstance(png, (bytes, bytearray)):
            (self.results_dir / job_id).mkdir(exist_ok=True)
            name = f"{job_id}/{seq}.png"  # by seq: request ids never become paths
            (self.results_dir / name).write_bytes(png)
            self.db.execute("UPDATE results SET png=? WHERE seq=?", (name, seq))
        self.db.execute("UPDATE jobs SET finished=finished+1, errors=errors+?, t_done=CASE WHEN finished+1>=total "
                        "THEN ? ELSE t_done END WHERE job_id=?", (0 if ok else 1, time.time(), job_id))
        return True

    def results_after(self, job_id: str, after: int, limit: int) -> list[tuple[int, dict]]:
        """Up to ``limit`` results of the job with ``seq > after``, oldest first, PNG bytes inline."""
        rows = self.db.execute("SELECT seq, rec, png FROM results WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?",
                               (job_id, after, limit)).fetchall()
        out = []
        for seq, blob, png in rows:
            rec = msgpack.unpackb(blob, raw=False, strict_map_key=False)
            rec["png"] = None
            if png:
                try:
                    rec["png"] = (self.results_dir / png).read_bytes()
                except OSError:
                    rec["png"] = None
            out.append((seq, rec))
        return out

    def last_seq(self, job_id: str) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM results WHERE job_id=?", (job_id,)).fetchone()[0]

    def mark_collected(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET collected_at=? WHERE job_id=? AND collected_at IS NULL", (time.time(), job_id))

    # ----- eviction -----------------------------------------------------------------------
    def evict(self, collected_retention_s: float, retention_s: float, now: float | None = None) -> list[str]:
        """Drop the results (rows and PNG files) and requests of finished jobs collected more
        than ``collected_retention_s`` ago, or finished more than ``retention_s`` ago; the job
        row stays with its counts. Returns the evicted job ids."""
        now = time.time() if now is None else now
        ids = [r[0] for r in self.db.execute(
            "SELECT job_id FROM jobs WHERE evicted_at IS NULL AND finished >= total AND "
            "((collected_at IS NOT NULL AND collected_at <= ?) OR (t_done IS NOT NULL AND t_done <= ?))",
            (now - collected_retention_s, now - retention_s))]
        for job_id in ids:
            with self._tx():
                self.db.execute("DELETE FROM results WHERE job_id=?", (job_id,))
                self.db.execute("DELETE FROM requests WHERE job_id=?", (job_id,))
                self.db.execute("UPDATE jobs SET evicted_at=? WHERE job_id=?", (now, job_id))
            shutil.rmtree(self.results_dir / job_id, ignore_errors=True)
        extra = self.db.execute("SELECT COUNT(*) FROM jobs WHERE evicted_at IS NOT NULL").fetchone()[0] - JOBS_KEPT
        if extra > 0:
            self.db.execute("DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs WHERE evicted_at IS NOT NULL "
                            "ORDER BY created LIMIT ?)", (extra,))
        return ids

    def counts(self) -> dict:
        n_jobs, n_res = self.db.execute("SELECT COUNT(*), (SELECT COUNT(*) FROM results) FROM jobs").fetchone()
        return {"jobs_stored": n_jobs, "results_stored": n_res}

    def _tx(self):
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def _job_dict(row) -> dict:
    keys = ("job_id", "name", "total", "created", "state", "finished", "errors", "t_done", "collected_at",
            "evicted_at", "cancel_info")
    d = dict(zip(keys, row))
    d["cancel_info"] = json.loads(d["cancel_info"]) if d["cancel_info"] else None
    return d
