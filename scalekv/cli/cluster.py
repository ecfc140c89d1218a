"""``scalekv cluster start|stop`` (parsers; the commands are in ``lifecycle.py``), ``submit``,
``wait``, ``jobs``, ``cancel`` and ``status``. Imports of Ray and torch stay inside the commands
so ``scalekv --help`` stays fast.

Cluster lifetime. ``cluster start --address HOST:PORT`` puts a detached scheduler (and its
workers) on a Ray cluster someone started (``ray start --head``) and exits; it runs until
``cluster stop``. Without ``--address`` the CLI starts a local Ray instance in a background
keeper process (``scheduler/keeper.py``, log in the state directory), bound to 127.0.0.1 unless
``--bind`` says otherwise, since a Ray instance dies with the process that started it;
``cluster stop`` stops the scheduler, then the keeper, which shuts that Ray instance down.

The state directory (``$SCALEKV_STATE_DIR``, default ``~/.scalekv``) identifies the cluster:
``cluster.json`` records its address, its own Ray namespace (``scalekv-<random>`` for a local
cluster), the scheduler name and the keeper's pid and start time; ``store/`` holds the durable
job store (``scheduler/store.py``). Every other command acts on the cluster recorded there, or on
``--address`` (+ ``--name``/``--namespace``); with neither it fails at once rather than joining
whatever Ray instance runs on the machine. ``cluster stop`` signals the recorded keeper only
after checking it is still that process (start time and command line), and a record whose
cluster is gone is reported in seconds, with ``cluster stop --forget`` as the way out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import args as shared
from .args import fail as _fail
from .lifecycle import cmd_cluster_start, cmd_cluster_stop, format_status

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

Limits: a record is at most 64 KiB and nests at most 8 levels (else it is a record error);
request_id is 1-128 characters of [A-Za-z0-9._-]; num 1..10000; seed in [0, 2^63) (seed+num
too); cfg in [0, 100]; top_k in [0, 2^20] (0 disables); top_p in [0, 1] (0 disables);
kv_budget in (0, 1]; policy one of `scalekv models` lists (at most 64 characters).

The job id is printed first; the job is stored by the cluster, so it survives a scheduler
restart (submit waits and resumes) and Ctrl-C (the job keeps running: `scalekv wait JOB --out
DIR` collects it; `scalekv cancel JOB` stops it).

Writes DIR/<request_id>.png and DIR/results.jsonl, one record per request in the same schema
as `scalekv generate` (job_id, request_id, record, class_label, seed, ok, error, fields, png,
tokens, kv_peak_bytes, seconds, stats), optionally DIR/results.msgpack (with PNG bytes).
Exit code 0: all images; 1: some requests failed; 2: the job could not run or its results
could not all be collected; 130: interrupted (the job keeps running).
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cluster``, ``submit``, ``wait``, ``jobs``, ``cancel`` and ``status`` to the parser."""
    c = shared.add_parser(sub, "cluster", "start or stop a scalekv cluster (Ray scheduler + workers)")
    csub = c.add_subparsers(dest="cluster_command", required=True)

    s = shared.add_parser(csub, "start", "start the scheduler and workers on Ray",
                          description="Start the scheduler and its workers. With --address, on that Ray cluster; "
                                      "without, on a local Ray instance kept alive by a background process "
                                      "(listening on 127.0.0.1 only unless --bind). If the cluster recorded in "
                                      "$SCALEKV_STATE_DIR still runs Ray but its scheduler is gone, starts a new "
                                      "scheduler there, which resumes the stored jobs.")
    s.add_argument("--address", default=None,
                   help="Ray cluster: HOST:PORT or 'auto' (default: start a local Ray instance)")
    from scheduler.config import DEFAULT_NAME

    s.add_argument("--name", default=DEFAULT_NAME, help="scheduler actor name")
    s.add_argument("--namespace", default=None,
                   help="Ray namespace of the scheduler and workers (default: a fresh scalekv-<random> for a local "
                        "cluster, scalekv with --address)")
    s.add_argument("--bind", default="127.0.0.1",
                   help="local Ray only: the IP its servers listen on; a routable IP of this machine lets other "
                        "machines join (protect it with Ray token auth, see README)")
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
    s.add_argument("--store-dir", default=None,
                   help="durable job store (SQLite + result PNGs) on this node (default: $SCALEKV_STATE_DIR/store)")
    s.add_argument("--collected-retention", type=float, default=600.0,
                   help="seconds a fully collected job's results stay in the store")
    s.add_argument("--retention", type=float, default=7 * 86400.0,
                   help="seconds a finished job's results stay in the store if nobody collects them")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers to come up")
    shared.add_json(s, "the cluster status")
    shared.add_engine_args(s)
    s.set_defaults(func=cmd_cluster_start)

    st = shared.add_parser(csub, "stop", "stop the scheduler and workers (and a local Ray instance started by start)",
                           description="Stop the cluster recorded in $SCALEKV_STATE_DIR (or --address + --name): "
                                       "its scheduler and workers, and its local Ray keeper after checking the "
                                       "recorded pid is still that keeper. --forget only removes the record.")
    shared.add_cluster_target(st)
    st.add_argument("--forget", action="store_true",
                    help="remove the state file's record of a cluster that is gone; stops nothing")
    st.set_defaults(func=cmd_cluster_stop)

    j = shared.add_parser(sub, "submit", "run a job file on the cluster: PNGs + results.jsonl",
                          description=SUBMIT_HELP)
    j.add_argument("jobs", help="job file: JSONL or msgpack, one request record each")
    j.add_argument("--out", required=True, help="output directory (results.jsonl is rewritten)")
    shared.add_cluster_target(j)
    j.add_argument("--format", default=None, choices=["jsonl", "msgpack"], help="default: by suffix, else sniffed")
    j.add_argument("--job-id", default=None, help="name the job (default: a random id)")
    _add_collect_args(j)
    j.set_defaults(func=cmd_submit)

    w = shared.add_parser(sub, "wait", "re-attach to a job and collect its results (idempotent)",
                          description="Collect every result of a job into DIR, as `submit` writes them: after a "
                                      "Ctrl-C, a lost connection or a scheduler restart. Running it again "
                                      "rewrites the same files.")
    w.add_argument("job_id", metavar="JOB", help="job id (printed by submit; see `scalekv jobs`)")
    w.add_argument("--out", required=True, help="output directory (results.jsonl is rewritten)")
    shared.add_cluster_target(w)
    _add_collect_args(w)
    w.set_defaults(func=cmd_wait)

    ls = shared.add_parser(sub, "jobs", "list the cluster's jobs (newest first)")
    shared.add_cluster_target(ls)
    ls.add_argument("--limit", type=int, default=50, help="at most this many")
    shared.add_json(ls, "the job list")
    ls.set_defaults(func=cmd_jobs)

    cc = shared.add_parser(sub, "cancel", "cancel a job: drop its queued requests, abort its running ones")
    cc.add_argument("job_id", metavar="JOB", help="job id")
    shared.add_cluster_target(cc)
    shared.add_json(cc, "what was cancelled")
    cc.set_defaults(func=cmd_cancel)

    t = shared.add_parser(sub, "status", "workers, pool usage, queue depth, running requests, memory")
    shared.add_cluster_target(t)
    shared.add_json(t, "the full status")
    t.set_defaults(func=cmd_status)


def _add_collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--msgpack", action="store_true", help="also write results.msgpack (PNG bytes + stats)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    shared.add_json(p, "one result record per request")




def _connect(args: argparse.Namespace):
    """The cluster the command means (raises ConnectionError subclasses with the reason)."""
    from scheduler.client import ClusterClient

    return ClusterClient.connect(args.address, args.name, args.namespace)


# ----- submit / wait / jobs / cancel ---------------------------------------------------------
def _collect(client, job_id: str, out: Path, args: argparse.Namespace, total: int | None,
             expected: list[str] | None) -> int:
    """Stream every result of the job into ``out`` (rewriting results.jsonl); the exit code."""
    from tqdm import tqdm

    from scheduler.client import SchedulerGoneError
    from scheduler.wire import result_summary, write_results_msgpack

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    if args.msgpack:
        (out / "results.msgpack").write_bytes(b"")
    t0 = time.perf_counter()
    failed, errors, seen = 0, [], set()
    bar = None
    try:  # the bar too: a Ctrl-C may come while it is still being built
        bar = tqdm(total=total, desc=f"job {job_id}", unit="img", disable=args.json or not sys.stderr.isatty())
        with (out / "results.jsonl").open("a") as f:
            for r in client.stream(job_id, timeout=args.timeout):
                seen.add(r["request_id"])
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
    except (TimeoutError, SchedulerGoneError, LookupError, ValueError) as e:
        if bar is not None:
            bar.close()
        missing = sorted(set(expected) - seen) if expected else []
        more = f"; missing: {', '.join(missing[:20])}" + (f" ... ({len(missing)})" if len(missing) > 20 else "") \
            if missing else ""
        return _fail(f"{e}. {len(seen)} result(s) written to {out}/{more}. Once the cluster serves again "
                     f"(`scalekv cluster start` resumes stored jobs): scalekv wait {job_id} --out {out}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\nscalekv: interrupted; job {job_id} keeps running on the cluster ({len(seen)} result(s) in "
              f"{out}/): collect it with `scalekv wait {job_id} --out {out}`, stop it with "
              f"`scalekv cancel {job_id}`", file=sys.stderr)
        return 130
    bar.close()
    dt = time.perf_counter() - t0
    n = len(seen)
    if not args.json:
        for line in errors[:20]:
            print(f"  error {line}", file=sys.stderr)
        if len(errors) > 20:
            print(f"  ... {len(errors) - 20} more in {out / 'results.jsonl'}", file=sys.stderr)
        print(f"job {job_id}: {n - failed} image(s), {failed} error(s) in {dt:.2f}s "
              f"({(n - failed) / max(dt, 1e-9):.2f} img/s) -> {out}/", file=sys.stderr)
    return 1 if failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    import uuid

    from scheduler.scheduler import JOB_ID_RE
    from scheduler.wire import JobFileError, read_job_file

    try:
        records = read_job_file(args.jobs, args.format)
    except (JobFileError, FileNotFoundError) as e:
        return _fail(str(e))
    job_id = args.job_id or uuid.uuid4().hex[:12]
    if not JOB_ID_RE.match(job_id):
        return _fail(f"--job-id: must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit, "
                     f"got {job_id[:80]!r}")
    try:
        client = _connect(args)
    except ConnectionError as e:
        return _fail(str(e))
    print(json.dumps({"job_id": job_id}) if args.json else f"job {job_id}", flush=True)
    try:
        job = client.submit(records, name=Path(args.jobs).name, job_id=job_id)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"\nscalekv: interrupted while submitting job {job_id}: `scalekv jobs` shows whether it was taken",
              file=sys.stderr)
        return 130
    if not args.json:  # past this line a Ctrl-C detaches: the job is the cluster's and keeps running
        print(f"job {job_id}: {job['total']} image(s) queued; Ctrl-C detaches, the job keeps running",
              file=sys.stderr, flush=True)
    return _collect(client, job_id, Path(args.out), args, job["total"], job.get("request_ids"))


def cmd_wait(args: argparse.Namespace) -> int:
    try:
        client = _connect(args)
        st = client.job_status(args.job_id)
    except (ConnectionError, ValueError) as e:
        return _fail(str(e))
    if st.get("evicted"):
        return _fail(f"job {args.job_id}: its results were collected and evicted from the store")
    return _collect(client, args.job_id, Path(args.out), args, st["total"], None)


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        jobs = _connect(args).jobs(args.limit)
    except ConnectionError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(jobs, default=str))
        return 0
    print(f"{'job':<16} {'name':<20} {'state':<10} {'finished':>11} {'errors':>6} {'results':<10} {'age':>8}")
    for j in jobs:
        kept = "evicted" if j["evicted"] else "collected" if j["collected"] else "stored"
        state = j["state"] if j["state"] == "cancelled" else ("done" if j["done"] else "running")
        print(f"{j['job_id']:<16} {str(j['name'])[:20]:<20} {state:<10} {j['finished']:>5}/{j['total']:<5} "
              f"{j['errors']:>6} {kept:<10} {time.time() - j['created']:>7.0f}s")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        got = _connect(args).cancel(args.job_id)
    except (ConnectionError, ValueError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(got, default=str))
    elif got.get("already_done"):
        print(f"job {args.job_id} had already finished: nothing to cancel")
    else:
        print(f"job {args.job_id} cancelled: {got['queued_removed']} queued request(s) dropped, "
              f"{got['running_cancelled']} running request(s) aborted, {got['pages_freed']} KV page(s) freed")
    return 0


# ----- status ------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = _connect(args).status(fresh=True)
    except (ConnectionError, RuntimeError) as e:
        return _fail(str(e))
    print(json.dumps(st, default=str, indent=1) if args.json else format_status(st))
    return 0


