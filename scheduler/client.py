"""``ClusterClient``: the Python API of a scalekv cluster (the CLI is a thin layer over it).

    from scheduler.client import ClusterClient
    from scheduler.config import SchedulerConfig
    from workers.config import WorkerConfig

    client = ClusterClient.start(SchedulerConfig(num_workers=2, worker=WorkerConfig(model="var-tiny")))
    job = client.submit_file("jobs.jsonl")            # or client.submit([{"class_label": 3, "num": 8}])
    for result in client.stream(job):                  # dicts: request_id, ok, error, png, tokens, stats
        ...
    print(client.status())
    client.stop()

``connect(address)`` joins a running cluster (``"auto"``, ``"HOST:PORT"``, or None: the address
``scalekv cluster start`` recorded in the state file); ``start`` creates the scheduler (and its
workers) on the Ray cluster this process is connected to, starting a local Ray instance if none.
Job files are decoded here, so a corrupt file is refused before anything reaches the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import DEFAULT_NAME, NAMESPACE, SchedulerConfig
from .wire import RawRecord, read_job_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def state_file() -> Path:
    """Where ``scalekv cluster start`` records the cluster it started (address, keeper pid)."""
    base = os.environ.get("SCALEKV_STATE_DIR") or str(Path.home() / ".scalekv")
    return Path(base) / "cluster.json"


def read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def resolve_address(address: str | None) -> str:
    """--address flag, else RAY_ADDRESS, else the state file, else 'auto'."""
    return address or os.environ.get("RAY_ADDRESS") or read_state().get("address") or "auto"


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect this process to Ray once. ``address=None`` with no cluster running starts a local
    one (tests, notebooks); an existing connection is reused whatever the address."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    if address is None:
        kwargs.update(address="local", num_cpus=num_cpus)
    else:
        kwargs["address"] = address
        if address not in ("auto", "local"):
            _token_auth_for_explicit_address()
    # Workers import engine/, memory/, workers/ from the repository (editable or not installed).
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    ray.init(**kwargs)


def _token_auth_for_explicit_address() -> None:
    """Ray (>= 2.59) turns token auth on for local instances, and a driver joining by ``auto``
    picks the token up, but one joining by HOST:PORT only sends it when RAY_AUTH_MODE=token.
    Do what ``auto`` does: use the token when one is available and the mode is not set.
    (A token sent to a cluster without auth is ignored.)"""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it as ray.init(address="auto") does
            from ray._raylet import Config

            Config.initialize("")
        except Exception as e:  # a Ray without this internal: the env var alone may do
            log.debug("could not refresh Ray's auth config: %s", e)


class ClusterClient:
    """Handle on a running scheduler: submit jobs, stream results, status, stop."""

    def __init__(self, scheduler: Any, name: str = DEFAULT_NAME) -> None:
        self.scheduler = scheduler
        self.name = name

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def connect(cls, address: str | None = None, name: str = DEFAULT_NAME) -> ClusterClient:
        """Attach to the named scheduler of a running cluster."""
        import ray

        where = resolve_address(address)
        try:
            ensure_ray(where)
        except ConnectionError as e:
            raise ConnectionError(f"cannot reach a Ray cluster at {where!r} ({e}); start one with "
                                  "`scalekv cluster start` or pass --address HOST:PORT") from None
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise ConnectionError(f"no scalekv scheduler named {name!r} in namespace {NAMESPACE!r} on this Ray "
                                  "cluster: run `scalekv cluster start` first") from None
        return cls(handle, name)

    @classmethod
    def start(cls, config: SchedulerConfig, address: str | None = None, detached: bool = True,
              wait: bool = True, timeout: float = 300.0) -> ClusterClient:
        """Create the scheduler and its workers on the Ray cluster at ``address`` (None: the
        current connection, or a new local instance) and wait until the workers are up."""
        import ray

        from .scheduler import start_scheduler

        ensure_ray(address)
        try:
            ray.get_actor(config.name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise RuntimeError(f"a scheduler named {config.name!r} is already running: "
                               "`scalekv cluster stop` it first, or pick another --name")
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        handle = start_scheduler(config, detached=detached, runtime_env={"env_vars": {"PYTHONPATH": path}})
        client = cls(handle, config.name)
        if wait:
            try:
                client.wait_ready(timeout)
            except Exception:
                client.stop()
                raise
        return client

    # ----- calls ----------------------------------------------------------------------
    def wait_ready(self, timeout: float = 300.0) -> dict:
        import ray

        return _unwrap(lambda: ray.get(self.scheduler.wait_ready.remote(timeout)))

    def submit(self, records: list[RawRecord | dict], name: str = "", job_id: str | None = None) -> dict:
        """Queue a job (decoded records or plain dicts). Returns {job_id, total, queued, rejected}."""
        import ray

        return _unwrap(lambda: ray.get(self.scheduler.submit_job.remote(list(records), name, job_id)))

    def submit_file(self, path: str | Path, fmt: str | None = None, job_id: str | None = None) -> dict:
        """Read a JSONL or msgpack job file and submit it; a corrupt file raises JobFileError
        here and nothing is sent."""
        return self.submit(read_job_file(path, fmt), name=Path(path).name, job_id=job_id)

    def get_results(self, job_id: str, max_wait: float = 1.0) -> dict:
        import ray

        return _unwrap(lambda: ray.get(self.scheduler.get_results.remote(job_id, max_wait)))

    def stream(self, job: str | dict, max_wait: float = 1.0, timeout: float | None = None,
               previews: bool = False) -> Iterator[dict]:
        """Yield results as they finish until the job is done (each result exactly once);
        ``previews``: also the preview records of requests with ``preview_every``."""
        job_id = job["job_id"] if isinstance(job, dict) else job
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_results(job_id, max_wait)
            yield from (r for r in batch["results"] if previews or not r.get("preview"))
            if batch["done"]:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: {batch['finished']}/{batch['total']} finished after {timeout}s")

    def run(self, records: list[RawRecord | dict], timeout: float | None = None) -> list[dict]:
        """Submit and collect every result (convenience for programs and tests)."""
        return list(self.stream(self.submit(records), timeout=timeout))

    def status(self, fresh: bool = False) -> dict:
        import ray

        return _unwrap(lambda: ray.get(self.scheduler.status.remote(fresh)))

    def worker_handles(self) -> dict:
        import ray

        return ray.get(self.scheduler.worker_handles.remote())

    def worker_stats(self) -> dict[str, dict]:
        """Fresh stats straight from every worker that answers (pool, requests, memory)."""
        import ray

        out = {}
        for name, h in self.worker_handles().items():
            try:
                out[name] = ray.get(h.stats.remote(), timeout=60)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def stop(self, timeout: float = 30.0) -> dict:
        """Fail what is still queued, stop and kill the workers, then the scheduler."""
        import ray

        try:
            summary = ray.get(self.scheduler.shutdown.remote(timeout), timeout=timeout + 30)
        except Exception as e:
            summary = {"error": f"{type(e).__name__}: {e}"}
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.scheduler, no_restart=True)
        return summary


# ----- online serving (scheduler/http.py) ------------------------------------------------------
def _get_results_multi(self, job_ids: list[str], max_wait: float = 1.0) -> dict:
    """Results of several jobs in one call (``Scheduler.get_results_multi``)."""
    import ray

    return _unwrap(lambda: ray.get(self.scheduler.get_results_multi.remote(list(job_ids), max_wait)))


def _cancel(self, job_id: str) -> dict:
    """Cancel a job: queued requests are dropped, running ones aborted (their pages return)."""
    import ray

    return _unwrap(lambda: ray.get(self.scheduler.cancel_job.remote(job_id)))


# Added as plain functions so a ``cancel`` the durable-cluster branch defines in the class wins.
for _name, _fn in (("get_results_multi", _get_results_multi), ("cancel", _cancel)):
    if not hasattr(ClusterClient, _name):
        setattr(ClusterClient, _name, _fn)


def _unwrap(call):
    """Ray wraps exceptions raised in an actor as RayTaskError(cause); re-raise the cause so
    callers see ValueError/RuntimeError with the scheduler's message."""
    from ray.exceptions import RayTaskError

    try:
        return call()
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
