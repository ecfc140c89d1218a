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

``connect(address)`` joins a running cluster: ``"HOST:PORT"`` (or ``"auto"``, said explicitly),
or None: the cluster ``scalekv cluster start`` recorded in the state file
(``$SCALEKV_STATE_DIR/cluster.json``: address, Ray namespace, scheduler name, keeper pid). With
neither, it fails at once (``NoClusterError``): it never guesses ``auto``, which would join
whatever Ray instance runs on the machine, another user's included. A recorded address is
probed with a short TCP connect before ``ray.init`` (``StaleClusterError`` in about a second
instead of Ray's minutes of reconnecting). ``start`` creates the scheduler (and its workers) on
the Ray cluster this process is connected to, starting a local Ray instance if none.

Every call to the scheduler goes through ``_call``, which waits while Ray restarts the actor
(it is restartable when the cluster has a durable store) and retries; ``submit`` names the job
before sending it, so a retried submit finds the job it already created. Job files are decoded
here, so a corrupt file is refused before anything reaches the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_NAME, NAMESPACE, SchedulerConfig
from .wire import RawRecord, check_records, read_job_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_TIMEOUT_S = 2.0  # TCP connect to a recorded GCS address before ray.init
RESTART_WAIT_S = 180.0  # how long calls wait for a restarting scheduler
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class NoClusterError(ConnectionError):
    """No --address and no state file: nothing says which cluster is meant."""


class StaleClusterError(ConnectionError):
    """The state file names a cluster that is not running any more."""


class SchedulerGoneError(ConnectionError):
    """The scheduler actor died for good (not restarting)."""


def state_dir() -> Path:
    return Path(os.environ.get("SCALEKV_STATE_DIR") or str(Path.home() / ".scalekv"))


def state_file() -> Path:
    """Where ``scalekv cluster start`` records the cluster it started (address, keeper pid)."""
    return state_dir() / "cluster.json"


def read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def no_cluster_message() -> str:
    return (f"no scalekv cluster is recorded in {state_file()} (set by $SCALEKV_STATE_DIR, default ~/.scalekv): "
            "start one with `scalekv cluster start`, or name a running one with --address HOST:PORT "
            "(and --name / --namespace)")


@dataclass
class Target:
    """Which cluster a command means: Ray address, Ray namespace, scheduler name, and the
    state file's record when it came from there."""

    address: str
    namespace: str
    name: str
    state: dict


def resolve_target(address: str | None = None, name: str | None = None, namespace: str | None = None) -> Target:
    """--address flag, else RAY_ADDRESS, else the state file; never an implicit 'auto'.
    Namespace and name default to the state file's when it names the same address."""
    state = read_state()
    where = address or os.environ.get("RAY_ADDRESS") or state.get("address")
    if not where:
        raise NoClusterError(no_cluster_message())
    same = bool(state) and state.get("address") == where
    return Target(where, namespace or (state.get("namespace") if same else None) or NAMESPACE,
                  name or (state.get("name") if same else None) or DEFAULT_NAME, state if same else {})


def keeper_identity(pid: int | None) -> dict | None:
    """``{"start": ticks, "cmdline": str}`` of a live process, or None. The start time (field 22
    of /proc/PID/stat) tells a recycled pid from the keeper that was recorded."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return {"start": int(fields[19]), "cmdline": cmd}


def keeper_is_ours(state: dict) -> bool:
    """The recorded keeper pid is alive and is still that keeper (same start time, keeper cmdline)."""
    ident = keeper_identity(state.get("keeper_pid"))
    if ident is None or "scheduler.keeper" not in ident["cmdline"]:
        return False
    return state.get("keeper_start") is None or ident["start"] == state["keeper_start"]


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if something accepts TCP connections at HOST:PORT, else why not."""
    if address in ("auto", "local") or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def check_reachable(target: Target) -> None:
    """Raise StaleClusterError (in about PROBE_TIMEOUT_S) if the target's GCS does not answer."""
    why = probe(target.address)
    if why is None:
        return
    st = target.state
    if st:
        keeper = ""
        if st.get("keeper_pid"):
            keeper = (" and its keeper process (pid " + str(st["keeper_pid"]) + ") is " +
                      ("still running" if keeper_is_ours(st) else "gone"))
        raise StaleClusterError(f"the cluster recorded in {state_file()} is not running: nothing answers at "
                                f"{target.address} ({why}){keeper}. `scalekv cluster stop --forget` removes the "
                                "record; `scalekv cluster start` starts a new cluster")
    raise StaleClusterError(f"nothing answers at {target.address} ({why}): is the Ray cluster running?")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, namespace: str = NAMESPACE) -> None:
    """Connect this process to Ray once. ``address=None`` with no cluster running starts a local
    one (tests, notebooks). An existing connection is reused only if it is to that address."""
    import ray

    if ray.is_initialized():
        if address not in (None, "auto", "local"):
            current = ray.get_runtime_context().gcs_address
            if current != address:
                raise ConnectionError(f"this process is already connected to the Ray cluster at {current}, "
                                      f"not {address}: one process talks to one cluster")
        return
    # Ray's INFO lines ("Started a local Ray instance", "Connecting to existing Ray cluster") are
    # off unless asked for: SCALEKV_RAY_LOG_LEVEL=INFO brings them back.
    kwargs: dict[str, Any] = dict(namespace=namespace, include_dashboard=False, log_to_driver=False,
                                  logging_level=os.environ.get("SCALEKV_RAY_LOG_LEVEL", "WARNING"))
    if address is None:
        kwargs.update(address="local", num_cpus=num_cpus)
    else:
        kwargs["address"] = address
        if address not in ("auto", "local"):
            _token_auth_for_explicit_address()
            if address.rpartition(":")[0].strip("[]") in LOOPBACK:
                use_loopback_node_ip()
    # Workers import engine/, memory/, workers/ from the repository (editable or not installed).
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    ray.init(**kwargs)


def use_loopback_node_ip() -> None:
    """Make this process's Ray see the machine as 127.0.0.1, as a loopback-bound local cluster
    does (the keeper sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which is how Ray runs a
    single-machine instance on loopback only). Without it, Ray rewrites a 127.0.0.1 address
    to the machine's external IP, where a loopback cluster does not listen."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with contextlib.suppress(Exception):  # the constant is read at call time
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = False


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
    """Handle on a running scheduler: submit jobs, stream results, status, cancel, stop."""

    def __init__(self, scheduler: Any, name: str = DEFAULT_NAME, namespace: str = NAMESPACE,
                 restart_wait_s: float = RESTART_WAIT_S) -> None:
        self.scheduler = scheduler
        self.name = name
        self.namespace = namespace
        self.restart_wait_s = restart_wait_s

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def connect(cls, address: str | None = None, name: str | None = None,
                namespace: str | None = None) -> ClusterClient:
        """Attach to the named scheduler of a running cluster (see ``resolve_target``)."""
        target = resolve_target(address, name, namespace)  # fails at once, before Ray is even imported
        check_reachable(target)
        import ray

        try:
            ensure_ray(target.address, namespace=target.namespace)
        except ConnectionError as e:
            raise ConnectionError(f"cannot reach a Ray cluster at {target.address!r} ({e}); start one with "
                                  "`scalekv cluster start` or pass --address HOST:PORT") from None
        try:
            handle = ray.get_actor(target.name, namespace=target.namespace)
        except ValueError:
            hint = ("its keeper still runs Ray: `scalekv cluster start` starts a new scheduler on it and resumes "
                    "the stored jobs" if target.state.get("keeper_pid") else "run `scalekv cluster start` first")
            raise SchedulerGoneError(f"no scalekv scheduler named {target.name!r} in Ray namespace "
                                     f"{target.namespace!r} at {target.address}: {hint}") from None
        return cls(handle, target.name, target.namespace)

    @classmethod
    def start(cls, config: SchedulerConfig, address: str | None = None, detached: bool = True,
              wait: bool = True, timeout: float = 300.0) -> ClusterClient:
        """Create the scheduler and its workers on the Ray cluster at ``address`` (None: the
        current connection, or a new local instance) and wait until the workers are up."""
        import ray

        from .scheduler import start_scheduler

        ensure_ray(address, namespace=config.namespace)
        try:
            ray.get_actor(config.name, namespace=config.namespace)
        except ValueError:
            pass
        else:
            raise RuntimeError(f"a scheduler named {config.name!r} is already running: "
                               "`scalekv cluster stop` it first, or pick another --name")
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        handle = start_scheduler(config, detached=detached, runtime_env={"env_vars": {"PYTHONPATH": path}})
        client = cls(handle, config.name, config.namespace)
        if wait:
            try:
                client.wait_ready(timeout)
            except Exception:
                client.stop()
                raise
        return client

    # ----- calls ----------------------------------------------------------------------
    def _call(self, method: str, *args: Any, timeout: float | None = None, retry: bool = True) -> Any:
        """Call a scheduler method; while Ray restarts the actor, wait and retry (up to
        ``restart_wait_s``). Raises SchedulerGoneError if it died for good."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                return _unwrap(lambda: ray.get(getattr(self.scheduler, method).remote(*args), timeout=timeout))
            except (RayActorError, GetTimeoutError) as e:
                if not retry or time.monotonic() > deadline:
                    raise SchedulerGoneError(f"the scheduler did not answer {method} ({type(e).__name__}) within "
                                             f"{self.restart_wait_s:.0f}s") from None
                try:  # a name lookup tells a restarting actor from one that is gone
                    self.scheduler = ray.get_actor(self.name, namespace=self.namespace)
                except ValueError:
                    raise SchedulerGoneError(f"the scheduler {self.name!r} died and is not restarting "
                                             f"({type(e).__name__})") from None
                log.warning("scheduler unavailable (%s); retrying %s", type(e).__name__, method)
                time.sleep(0.5)

    def wait_ready(self, timeout: float = 300.0) -> dict:
        return self._call("wait_ready", timeout)

    def submit(self, records: list[RawRecord | dict], name: str = "", job_id: str | None = None) -> dict:
        """Queue a job (decoded records or plain dicts). Returns {job_id, total, queued, rejected}.
        The job id is chosen here, so a retry after a scheduler restart finds the same job."""
        import ray
        from ray.exceptions import RayActorError

        job_id = job_id or uuid.uuid4().hex[:12]
        records = check_records(list(records))
        exist_ok = False  # a retry may find the job its lost first try created
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                ref = self.scheduler.submit_job.remote(records, name, job_id, 300.0, exist_ok)
                return _unwrap(lambda r=ref: ray.get(r))
            except RayActorError as e:
                exist_ok = True
                if time.monotonic() > deadline:
                    raise SchedulerGoneError(f"the scheduler did not take job {job_id} within "
                                             f"{self.restart_wait_s:.0f}s ({type(e).__name__})") from None
                try:
                    self.scheduler = ray.get_actor(self.name, namespace=self.namespace)
                except ValueError:
                    raise SchedulerGoneError(f"the scheduler {self.name!r} died and is not restarting") from None
                time.sleep(0.5)

    def submit_file(self, path: str | Path, fmt: str | None = None, job_id: str | None = None) -> dict:
        """Read a JSONL or msgpack job file and submit it; a corrupt file raises JobFileError
        here and nothing is sent."""
        return self.submit(read_job_file(path, fmt), name=Path(path).name, job_id=job_id)

    def get_results(self, job_id: str, max_wait: float = 1.0, after: int | None = None,
                    max_results: int = 128) -> dict:
        return self._call("get_results", job_id, max_wait, max_results, after, timeout=max_wait + 60)

    def stream(self, job: str | dict, max_wait: float = 1.0, timeout: float | None = None,
               after: int = 0, previews: bool = False) -> Iterator[dict]:
        """Yield the job's results after cursor ``after`` (0: all) as they finish, until the job
        is done, each once per call; survives a scheduler restart (the cursor is kept here).
        ``previews``: also the preview records of requests with ``preview_every`` (live only)."""
        job_id = job["job_id"] if isinstance(job, dict) else job
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = after
        while True:
            batch = self.get_results(job_id, max_wait, cursor)
            cursor = batch["cursor"]
            yield from (r for r in batch["results"] if previews or not r.get("preview"))
            if batch["done"]:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: {batch['finished']}/{batch['total']} finished after {timeout}s")

    def run(self, records: list[RawRecord | dict], timeout: float | None = None) -> list[dict]:
        """Submit and collect every result (convenience for programs and tests)."""
        return list(self.stream(self.submit(records), timeout=timeout))

    def job_status(self, job_id: str) -> dict:
        return self._call("job_status", job_id)

    def jobs(self, limit: int = 100) -> list[dict]:
        return self._call("list_jobs", limit)

    def cancel(self, job_id: str) -> dict:
        """Cancel a job: queued requests dropped, running ones aborted (pages freed)."""
        return self._call("cancel_job", job_id)

    def status(self, fresh: bool = False) -> dict:
        return self._call("status", fresh)

    def worker_handles(self) -> dict:
        return self._call("worker_handles")

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
