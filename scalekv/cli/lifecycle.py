"""``scalekv cluster start`` and ``scalekv cluster stop``: a cluster's lifetime (the local Ray keeper,
the scheduler, the state file that names them).

Ray and torch are imported inside the commands so ``scalekv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .args import fail as _fail


# ----- cluster start / stop ----------------------------------------------------------------
def _scheduler_config(args: argparse.Namespace, namespace: str, store_dir: str):
    from engine.config import EngineConfig
    from engine.models.registry import INFINITY_MODELS, default_checkpoint_dir, get_spec
    from scheduler.config import SchedulerConfig
    from workers.config import WorkerConfig

    shipped = args.model not in INFINITY_MODELS and default_checkpoint_dir(get_spec(args.model)) is not None
    if args.checkpoint is None and not args.random_init and not shipped:
        raise ValueError(f"model {args.model!r} has no shipped weights: pass --checkpoint PATH "
                         "(and --tokenizer PATH) or --random-init")
    engine = EngineConfig.from_args(args)
    worker = WorkerConfig(model=args.model, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                          random_init=args.random_init, engine=engine, threads=args.threads, device=args.device)
    return SchedulerConfig(name=args.name, num_workers=args.workers, worker=worker, max_restarts=args.max_restarts,
                           max_attempts=args.max_attempts, worker_start_timeout_s=args.timeout,
                           cpus_per_worker=args.cpus_per_worker, namespace=namespace, store_dir=store_dir,
                           collected_retention_s=args.collected_retention, retention_s=args.retention)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _start_keeper(args: argparse.Namespace, namespace: str) -> dict:
    """Start the keeper process (a local Ray instance) and wait for its address."""
    from scheduler.client import REPO_ROOT, state_dir

    sdir = state_dir()
    sdir.mkdir(parents=True, exist_ok=True)
    ready = sdir / "keeper.ready"
    ready.unlink(missing_ok=True)
    log_path = sdir / "keeper.log"
    cmd = [sys.executable, "-m", "scheduler.keeper", "--ready", str(ready), "--bind", args.bind,
           "--namespace", namespace]
    if args.num_cpus is not None:
        cmd += ["--num-cpus", str(args.num_cpus)]
    if args.num_gpus is not None:
        cmd += ["--num-gpus", str(args.num_gpus)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))
                                                      if x))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(REPO_ROOT), start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the local Ray keeper exited with code {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the local Ray instance did not come up within 120s; see {log_path}")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    ready.unlink(missing_ok=True)
    return {"address": info["address"], "keeper_pid": proc.pid, "keeper_start": info.get("start"),
            "keeper_log": str(log_path), "bind": args.bind}


def _write_state(state: dict) -> Path:
    from scheduler.client import state_file

    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
    return path


def cmd_cluster_start(args: argparse.Namespace) -> int:
    import uuid

    from scheduler.client import ClusterClient, keeper_is_ours, probe, read_state, state_dir
    from scheduler.config import NAMESPACE

    old = read_state()
    state: dict = {"name": args.name, "started_at": time.time()}
    resume = False
    if args.address is None:
        if old.get("keeper_pid") and keeper_is_ours(old) and probe(old.get("address", "")) is None:
            if old.get("name") != args.name:
                return _fail(f"the local cluster recorded in {state_dir()} runs scheduler {old.get('name')!r}; "
                             "pass that --name, or `scalekv cluster stop` first")
            resume = True  # its Ray is up: start a scheduler on it if none runs (it resumes the stored jobs)
            state = dict(old, started_at=time.time())
        else:
            namespace = args.namespace or f"scalekv-{uuid.uuid4().hex[:8]}"
            try:
                state.update(_start_keeper(args, namespace), namespace=namespace)
            except RuntimeError as e:
                return _fail(str(e))
    else:
        state["address"] = args.address
        state["namespace"] = args.namespace or (old.get("namespace") if old.get("address") == args.address
                                                else None) or NAMESPACE
        if old.get("address") == args.address and keeper_is_ours(old):  # recovery on our own keeper: keep it
            state.update({k: old[k] for k in ("keeper_pid", "keeper_start", "keeper_log", "bind") if k in old})
    state["store_dir"] = str(Path(args.store_dir).resolve()) if args.store_dir else \
        state.get("store_dir") or str(state_dir() / "store")
    try:
        config = _scheduler_config(args, state["namespace"], state["store_dir"])
    except ValueError as e:
        if state.get("keeper_pid") and not resume:
            _stop_keeper(state)
        return _fail(str(e))
    try:
        client = ClusterClient.start(config, address=state["address"], timeout=args.timeout)
    except (RuntimeError, ValueError, ConnectionError) as e:
        if state.get("keeper_pid") and not resume:
            _stop_keeper(state)
        return _fail(f"cluster did not start: {e}")
    if state["address"] == "auto":
        import ray

        state["address"] = ray.get_runtime_context().gcs_address
    path = _write_state(state)
    status = client.status()
    if args.json:
        print(json.dumps(status, default=str))
    else:
        print(format_status(status))
        where = f"local Ray instance (keeper pid {state['keeper_pid']})" if state.get("keeper_pid") else "Ray"
        restored = status["scheduler"].get("restored", 0)
        print(f"\nscheduler {args.name!r} up on {where} at {state['address']} (namespace {state['namespace']}); "
              f"state in {path}, jobs in {state['store_dir']}"
              + (f"; resumed {restored} stored request(s)" if restored else "") +
              "\nnext: scalekv submit JOBS.jsonl --out DIR   |   scalekv status   |   scalekv cluster stop")
    return 0


def _stop_keeper(state: dict, timeout: float = 60.0) -> bool:
    """SIGTERM the recorded keeper, only if that pid is still the keeper we started."""
    from scheduler.client import keeper_is_ours

    pid = state.get("keeper_pid")
    if not _pid_alive(pid):
        return True
    if not keeper_is_ours(state):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _pid_alive(pid)


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from scheduler.client import (
        ClusterClient,
        NoClusterError,
        SchedulerGoneError,
        keeper_identity,
        keeper_is_ours,
        probe,
        read_state,
        resolve_target,
        state_file,
    )

    if args.forget:
        state = read_state()
        state_file().unlink(missing_ok=True)
        print(f"forgot {state_file()}" + (f" (cluster at {state.get('address')}); nothing was stopped" if state
                                         else ": nothing was recorded"))
        return 0
    try:
        target = resolve_target(args.address, args.name, args.namespace)
    except NoClusterError as e:
        return _fail(str(e))
    state = target.state
    keeper = state.get("keeper_pid")
    ours = bool(keeper) and keeper_is_ours(state)
    why = probe(target.address)
    stopped_scheduler = None
    if why is None:
        try:
            client = ClusterClient.connect(target.address, target.name, target.namespace)
            stopped_scheduler = client.stop()
        except SchedulerGoneError as e:
            print(f"scalekv: {e}", file=sys.stderr)
        except ConnectionError as e:
            return _fail(str(e))
    elif not ours:
        now = keeper_identity(keeper) if keeper else None
        extra = "" if not keeper else (
            f"; recorded keeper pid {keeper} is gone" if now is None else
            f"; recorded keeper pid {keeper} is now another process ({now['cmdline'][:80]!r}): not signalled")
        return _fail(f"the cluster recorded in {state_file() if state else target.address} is not running "
                     f"(nothing answers at {target.address}: {why}){extra}. "
                     "`scalekv cluster stop --forget` removes the record")
    if keeper and not ours:
        print(f"scalekv: recorded keeper pid {keeper} is not the keeper any more: not signalled", file=sys.stderr)
    if ours:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # disconnect this driver before the instance goes away
        if not _stop_keeper(state):
            return _fail(f"local Ray keeper pid {keeper} did not exit; its log: {state.get('keeper_log')}")
    if state and (ours or stopped_scheduler is not None):
        state_file().unlink(missing_ok=True)
    if stopped_scheduler is None and not ours:
        return _fail(f"no scalekv scheduler {target.name!r} found to stop at {target.address}")
    print(f"stopped scheduler {target.name!r}" + (f" and local Ray (keeper pid {keeper})" if ours else "")
          + (f": {json.dumps(stopped_scheduler)}" if stopped_scheduler else ""))
    return 0


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f}MiB"


def format_status(st: dict) -> str:
    """The human view of ``Scheduler.status()``."""
    s = st["scheduler"]
    m = st.get("model") or {}
    alive = sum(w["state"] == "alive" for w in st["workers"])
    lines = [
        f"scheduler {s['name']}: {alive}/{len(st['workers'])} workers alive, model {m.get('model', '?')}, "
        f"queue {s['queue_depth']}, in flight {s['in_flight']}, jobs active {s['jobs_active']} "
        f"(of {s['jobs_total']}), results {s['results']} ({s['errors']} errors), requeued {s['requeued']}, "
        f"duplicates dropped {s['duplicates_dropped']}, worker failures {s['worker_failures']}",
        f"{'worker':<28} {'state':<8} {'restarts':>8} {'device':<6} {'thr':>3} {'running':>7} {'waiting':>7} "
        f"{'inflight':>8} {'pool used/total':>17} {'usage':>6} {'reserved':>8} {'rss':>8} {'device mem':>17}",
    ]
    roles = False
    for w in st["workers"]:
        ws = w.get("stats") or {}
        eng = ws.get("engine") or {}
        dev = ws.get("device_memory") or {}
        devmem = f"{_mib(dev.get('used_bytes'))}/{_mib(dev.get('total_bytes'))}" if dev.get("total_bytes") else "-"
        pool = f"{eng.get('used', '-')}/{eng.get('num_pages', w.get('num_pages') or '-')}"
        usage = f"{100 * eng['usage']:.1f}%" if "usage" in eng else "-"
        waiting = eng.get("num_requests_waiting", 0) + ws.get("inbox", 0) if eng else "-"
        lines.append(f"{w['name']:<28} {w['state']:<8} {w['restarts']:>8} {str(w.get('device') or '-'):<6} "
                     f"{ws.get('threads', '-'):>3} {eng.get('num_requests_running', '-'):>7} {waiting:>7} "
                     f"{w['in_flight']:>8} {pool:>17} {usage:>6} {eng.get('reserved_pages', '-'):>8} "
                     f"{_mib(ws.get('rss_bytes')):>8} {devmem:>17}")
        if w.get("error") and w["state"] != "alive":
            lines.append(f"    {w['error']}")
        roles |= "drafter_pages" in eng
    if roles:
        lines.append("pool pages by role: " + ", ".join(
            f"{w['name']}: drafter {(w.get('stats') or {}).get('engine', {}).get('drafter_pages', 0)} / refiner "
            f"{(w.get('stats') or {}).get('engine', {}).get('refiner_pages', 0)}" for w in st["workers"]))
    for j in st.get("jobs") or []:
        lines.append(f"job {j['job_id']} {j['name']}: {j['finished']}/{j['total']} finished, {j['errors']} errors, "
                     f"{j['state']}, {j['seconds']}s")
    if s.get("store"):
        lines.append(f"job store {s['store']}: {s.get('jobs_total', 0)} job(s), {s.get('results_stored', 0)} "
                     f"result(s) kept; {s.get('cancelled', 0)} request(s) cancelled"
                     + (f"; restarted, restored {s.get('restored', 0)}, reclaimed {s.get('reclaimed', 0)}"
                        if s.get("restarted") else ""))
    return "\n".join(lines)


