"""``scalekv cluster start|stop``, ``scalekv submit`` and ``scalekv status``.

Everything cluster-related on the command line lives here. Imports of Ray and torch stay
inside the commands so ``scalekv --help`` stays fast.

Cluster lifetime. ``cluster start --address auto|HOST:PORT`` puts a detached scheduler (and its
workers) on a Ray cluster someone started (``ray start --head``) and exits; it runs until
``cluster stop``. Without ``--address`` the CLI starts a local Ray instance in a background
keeper process (``scheduler/keeper.py``, log in the state directory), since a Ray instance dies
with the process that started it; ``cluster stop`` stops the scheduler, then the keeper, which
shuts that Ray instance down. The address is recorded in ``~/.scalekv/cluster.json``
(``$SCALEKV_STATE_DIR``), so ``submit``, ``status`` and ``stop`` find the cluster without
``--address``.
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

from . import args as shared

SUBMIT_HELP = """Run a job file on the cluster and stream the results.

A job file is JSONL (one JSON object a line) or msgpack (a stream of maps, or one array of
maps). Each record asks for `num` images:
  {"class_label": "ring-striped", "num": 4, "seed": 10, "cfg": 1.5, "top_k": 100,
   "top_p": 0.95, "policy": "full", "kv_budget": 1.0, "request_id": "rings"}
Only class_label (an index, or a class name: `scalekv models`) is required (num 1, seed 0,
sampling and KV knobs from the model / cluster). Image i of a record uses seed+i and is named
<request_id>-<i> when num > 1 (<request_id> when num is 1); request_id defaults to r<record
index> and must be unique in the job (the first record that claims an id wins). A malformed
record gets one error result naming every bad field; the others run. A corrupt or truncated
file is refused as a whole.

Writes DIR/<request_id>.png and DIR/results.jsonl, one record per request in the same schema
as `scalekv generate` (job_id, request_id, record, class_label, seed, ok, error, fields, png,
tokens, kv_peak_bytes, seconds, stats), optionally DIR/results.msgpack (with PNG bytes).
Exit code 0: all images; 1: some requests failed; 2: the job could not run.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cluster``, ``submit`` and ``status`` to the ``scalekv`` parser."""
    c = shared.add_parser(sub, "cluster", "start or stop a scalekv cluster (Ray scheduler + workers)")
    csub = c.add_subparsers(dest="cluster_command", required=True)

    s = shared.add_parser(csub, "start", "start the scheduler and workers on Ray",
                          description="Start the scheduler and its workers. With --address, on that Ray cluster; "
                                      "without, on a local Ray instance kept alive by a background process.")
    s.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' or HOST:PORT (default: start a local Ray instance)")
    from scheduler.config import DEFAULT_NAME

    s.add_argument("--name", default=DEFAULT_NAME, help="scheduler actor name")
    s.add_argument("--workers", type=int, default=None,
                   help="worker actors (default: one per GPU, or 1 without GPUs); CPU workers share the cores")
    s.add_argument("--num-cpus", type=int, default=None, help="local Ray only: CPUs it may use (default: all)")
    s.add_argument("--num-gpus", type=int, default=None, help="local Ray only: GPUs it may use (default: all)")
    shared.add_model_args(s, infinity=True)
    shared.add_threads(s, "torch threads per CPU worker (default: its share of the cores)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the workers run")
    s.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs each CPU worker reserves (default: its share of the cluster's CPUs)")
    s.add_argument("--max-restarts", type=int, default=3, help="Ray restarts of a dead worker (-1: unlimited)")
    s.add_argument("--max-attempts", type=int, default=3, help="tries of a request whose worker keeps dying")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers to come up")
    shared.add_json(s, "the cluster status")
    shared.add_engine_args(s)
    s.set_defaults(func=cmd_cluster_start)

    st = shared.add_parser(csub, "stop", "stop the scheduler and workers (and a local Ray instance started by start)")
    shared.add_cluster_target(st)
    st.set_defaults(func=cmd_cluster_stop)

    j = shared.add_parser(sub, "submit", "run a job file on the cluster: PNGs + results.jsonl",
                          description=SUBMIT_HELP)
    j.add_argument("jobs", help="job file: JSONL or msgpack, one request record each")
    j.add_argument("--out", required=True, help="output directory (results.jsonl is rewritten)")
    shared.add_cluster_target(j)
    j.add_argument("--format", default=None, choices=["jsonl", "msgpack"], help="default: by suffix, else sniffed")
    j.add_argument("--job-id", default=None, help="name the job (default: a random id)")
    j.add_argument("--msgpack", action="store_true", help="also write results.msgpack (PNG bytes + stats)")
    j.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    shared.add_json(j, "one result record per request")
    j.set_defaults(func=cmd_submit)

    t = shared.add_parser(sub, "status", "workers, pool usage, queue depth, running requests, memory")
    shared.add_cluster_target(t)
    shared.add_json(t, "the full status")
    t.set_defaults(func=cmd_status)


def _fail(msg: str) -> int:
    print(f"scalekv: error: {msg}", file=sys.stderr)
    return 2


# ----- cluster start / stop ----------------------------------------------------------------
def _scheduler_config(args: argparse.Namespace):
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
                           cpus_per_worker=args.cpus_per_worker)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _start_keeper(args: argparse.Namespace) -> dict:
    """Start the keeper process (a local Ray instance) and wait for its address."""
    from scheduler.client import REPO_ROOT, state_file

    state_dir = state_file().parent
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "keeper.ready"
    ready.unlink(missing_ok=True)
    log_path = state_dir / "keeper.log"
    cmd = [sys.executable, "-m", "scheduler.keeper", "--ready", str(ready)]
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
    return {"address": info["address"], "keeper_pid": proc.pid, "keeper_log": str(log_path)}


def cmd_cluster_start(args: argparse.Namespace) -> int:
    from scheduler.client import ClusterClient, read_state, state_file

    try:
        config = _scheduler_config(args)
    except ValueError as e:
        return _fail(str(e))
    state: dict = {"name": args.name, "started_at": time.time()}
    if args.address is None:
        old = read_state()
        if _pid_alive(old.get("keeper_pid")):
            return _fail(f"a local cluster started by `scalekv cluster start` is running (keeper pid "
                         f"{old['keeper_pid']}, Ray at {old.get('address')}): `scalekv cluster stop` first")
        try:
            state.update(_start_keeper(args))
        except RuntimeError as e:
            return _fail(str(e))
        address = state["address"]
    else:
        address = args.address
        state["address"] = None if address == "auto" else address
    try:
        client = ClusterClient.start(config, address=address, timeout=args.timeout)
    except (RuntimeError, ValueError, ConnectionError) as e:
        if state.get("keeper_pid"):
            _stop_keeper(state["keeper_pid"])
        return _fail(f"cluster did not start: {e}")
    if state.get("address") is None:
        import ray

        state["address"] = ray.get_runtime_context().gcs_address
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))
    status = client.status()
    if args.json:
        print(json.dumps(status, default=str))
    else:
        print(format_status(status))
        where = f"local Ray instance (keeper pid {state['keeper_pid']})" if state.get("keeper_pid") else "Ray"
        print(f"\nscheduler {args.name!r} up on {where} at {state['address']}; state in {path}\n"
              f"next: scalekv submit JOBS.jsonl --out DIR   |   scalekv status   |   scalekv cluster stop")
    return 0


def _stop_keeper(pid: int, timeout: float = 60.0) -> bool:
    if not _pid_alive(pid):
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _pid_alive(pid)


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from scheduler.client import ClusterClient, read_state, state_file

    state = read_state()
    stopped_scheduler = None
    try:
        client = ClusterClient.connect(args.address, args.name)
        stopped_scheduler = client.stop()
    except (ConnectionError, RuntimeError) as e:
        print(f"scalekv: {e}", file=sys.stderr)
    keeper = state.get("keeper_pid") if (args.address is None or args.address == state.get("address")) else None
    if keeper:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # disconnect this driver before the instance goes away
        if not _stop_keeper(keeper):
            return _fail(f"local Ray keeper pid {keeper} did not exit; its log: {state.get('keeper_log')}")
    if keeper or stopped_scheduler is not None:
        state_file().unlink(missing_ok=True)
    if stopped_scheduler is None and not keeper:
        return _fail("no scalekv cluster found to stop")
    print(f"stopped scheduler {args.name!r}" + (f" and local Ray (keeper pid {keeper})" if keeper else "")
          + (f": {json.dumps(stopped_scheduler)}" if stopped_scheduler else ""))
    return 0


# ----- submit ------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scheduler.client import ClusterClient
    from scheduler.wire import JobFileError, read_job_file, result_summary, write_results_msgpack

    try:
        records = read_job_file(args.jobs, args.format)
    except (JobFileError, FileNotFoundError) as e:
        return _fail(str(e))
    try:
        client = ClusterClient.connect(args.address, args.name)
        job = client.submit(records, name=Path(args.jobs).name, job_id=args.job_id)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return _fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    if args.msgpack:
        (out / "results.msgpack").write_bytes(b"")
    t0 = time.perf_counter()
    failed, errors = 0, []
    bar = tqdm(total=job["total"], desc=f"job {job['job_id']}", unit="img",
               disable=args.json or not sys.stderr.isatty())
    try:
        with (out / "results.jsonl").open("a") as f:
            for r in client.stream(job, timeout=args.timeout):
                rec = result_summary(r)
                if r["ok"] and r.get("png"):
                    name = f"{r['request_id']}.png"
                    (out / name).write_bytes(r["png"])
                    rec["png"] = name
                else:
                    failed += 1
                    errors.append(f"{r['request_id']}: {r['error']}")
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
                if args.msgpack:
                    write_results_msgpack([r], out / "results.msgpack")
                if args.json:
                    print(json.dumps(rec, default=str), flush=True)
                bar.update(1)
    except TimeoutError as e:
        bar.close()
        return _fail(str(e))
    bar.close()
    dt = time.perf_counter() - t0
    n = job["total"]
    if not args.json:
        for line in errors[:20]:
            print(f"  error {line}", file=sys.stderr)
        if len(errors) > 20:
            print(f"  ... {len(errors) - 20} more in {out / 'results.jsonl'}", file=sys.stderr)
        print(f"job {job['job_id']}: {n - failed} image(s), {failed} error(s) in {dt:.2f}s "
              f"({(n - failed) / max(dt, 1e-9):.2f} img/s) -> {out}/", file=sys.stderr)
    return 1 if failed else 0


# ----- status ------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from scheduler.client import ClusterClient

    try:
        st = ClusterClient.connect(args.address, args.name).status(fresh=True)
    except (ConnectionError, RuntimeError) as e:
        return _fail(str(e))
    print(json.dumps(st, default=str, indent=1) if args.json else format_status(st))
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
                     f"{j['pending_fetch']} not yet fetched, {j['seconds']}s")
    return "\n".join(lines)
