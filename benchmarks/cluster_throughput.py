"""Cluster throughput with 1 vs 2 (or more) workers on the same load, and the scheduler's overhead.

One local Ray instance (``--num-cpus``, default all cores) serves every run. For each worker
count the scheduler is started fresh, warmed up (every worker runs a few requests, so model
load and first-step allocation are not timed), then the whole load is submitted as one job and
timed from submit to the last result. CPU workers split the cores (2 workers on 2 cores: one
torch thread each; 1 worker: two threads), so the comparison is "same machine, same load";
``--threads 1`` pins every worker to one thread instead (same per-worker compute: does adding a
worker add throughput?). On a box where another job keeps a core busy, two torch threads can be
far slower than one (threads wait for a descheduled sibling), which is why both are worth a run.

Scheduler overhead is reported two ways:
- per request under load: client-observed time minus the time the request spent queued in the
  scheduler and inside the worker's engine (submit RPC, worker inbox wait, PNG encoding, poll
  and get_results hops), averaged over the load;
- one request at a time (no queueing): client round trip minus the engine's own time.
The in-process ``ImageEngine`` with the same threads runs the same load as the no-Ray baseline.

    python -m benchmarks.cluster_throughput --model var-tiny --random-init --num 32 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import machine, today


def _load(num: int, num_classes: int) -> list[dict]:
    return [{"class_label": (7 * i) % num_classes, "seed": 1000 + i, "request_id": f"b{i}"} for i in range(num)]


def run_cluster(args, engine_cfg, workers: int, load: list[dict]) -> dict:
    from scheduler.client import ClusterClient
    from scheduler.config import SchedulerConfig
    from workers.config import WorkerConfig

    wcfg = WorkerConfig(model=args.model, random_init=args.random_init, engine=engine_cfg, threads=args.threads)
    client = ClusterClient.start(SchedulerConfig(name=f"bench-{workers}w", num_workers=workers, worker=wcfg),
                                 detached=False)
    try:
        warm = client.run([{"class_label": 0, "num": 2 * workers, "seed": 1}], timeout=600)
        assert all(r["ok"] for r in warm)
        t0 = time.perf_counter()
        results = list(client.stream(client.submit(load), timeout=3600))
        wall = time.perf_counter() - t0
        assert len(results) == len(load) and all(r["ok"] for r in results), [r["error"] for r in results]
        overhead = [r["stats"]["scheduler_total_seconds"] - r["stats"]["scheduler_queue_seconds"] - r["seconds"]
                    for r in results]
        ran_on = [r["stats"]["worker"] for r in results]
        per_worker = {w: ran_on.count(w) for w in sorted(set(ran_on))}
        single = []
        for i in range(args.single):
            t = time.perf_counter()
            (r,) = client.run([{"class_label": i % 10, "seed": 5000 + i}], timeout=600)
            single.append((time.perf_counter() - t) - r["seconds"])
        threads = client.status(fresh=True)["workers"][0]["stats"]["threads"]
    finally:
        client.stop()
    return {"run": f"cluster, {workers} worker(s)", "workers": workers, "threads_per_worker": threads,
            "seconds": round(wall, 3), "images_per_s": round(len(load) / wall, 3), "per_worker": per_worker,
            "overhead_under_load_ms_mean": round(1e3 * statistics.mean(overhead), 2),
            "overhead_under_load_ms_p50": round(1e3 * statistics.median(overhead), 2),
            "overhead_single_ms_median": round(1e3 * statistics.median(single), 2) if single else None}


def _burn(seconds_out, n: int = 60) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a.T / 384)
    seconds_out.put(time.perf_counter() - t0)


def core_ceiling(procs: int = 2) -> float:
    """Throughput of ``procs`` single-threaded processes running the same matmul loop at once,
    relative to one alone: what the cores allow right now (another job may hold a core)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()

    def run(k: int) -> float:
        ps = [ctx.Process(target=_burn, args=(q,)) for _ in range(k)]
        for p in ps:
            p.start()
        times = [q.get() for _ in ps]
        for p in ps:
            p.join()
        return max(times)

    one = run(1)
    return round(procs * one / run(procs), 2)


def run_in_process(args, engine_cfg, load: list[dict], threads: int) -> dict:
    import torch

    from engine.api import ImageEngine
    from engine.models.registry import build_model
    from engine.request import ImageRequest

    torch.set_num_threads(threads)
    engine = ImageEngine(build_model(args.model, random_init=args.random_init), engine_cfg)
    engine.generate([ImageRequest(class_label=0, seed=1, request_id="warm")])
    reqs = [ImageRequest(request_id=r["request_id"], class_label=r["class_label"], seed=r["seed"]) for r in load]
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    for r in results:  # the cluster's workers encode PNGs too
        r.png_bytes()
    wall = time.perf_counter() - t0
    assert all(r.ok for r in results)
    return {"run": "in-process ImageEngine (no Ray)", "workers": 0, "threads_per_worker": threads,
            "seconds": round(wall, 3), "images_per_s": round(len(load) / wall, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="var-tiny")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--num", type=int, default=32, help="requests in the timed load")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: its share of --num-cpus); also the baseline's")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--kv-pool-bytes", default="256MiB")
    p.add_argument("--single", type=int, default=10, help="one-at-a-time requests for the latency overhead")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-process engine run")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from engine.config import EngineConfig, parse_bytes
    from engine.models.registry import get_spec
    from scheduler.client import ensure_ray

    engine_cfg = EngineConfig(dtype=args.dtype, kv_pool_bytes=parse_bytes(args.kv_pool_bytes))
    load = _load(args.num, get_spec(args.model).var.num_classes)
    rows = []
    if not args.no_baseline:  # before Ray starts, so no Ray process shares the machine with it
        rows.append(run_in_process(args, engine_cfg, load, args.threads or args.num_cpus))
        print(json.dumps(rows[-1]), flush=True)
    ceiling = core_ceiling(max(args.workers)) if max(args.workers) > 1 else None
    ensure_ray(None, num_cpus=args.num_cpus)
    for n in args.workers:
        rows.append(run_cluster(args, engine_cfg, n, load))
        print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["workers"] == min(args.workers))
    load_avg = os.getloadavg()
    report = {"date": today(), "machine": machine(), "cpu_count": os.cpu_count(), "ray_num_cpus": args.num_cpus,
              "load_average_1m_at_end": round(load_avg[0], 2), "core_ceiling": ceiling, "model": args.model,
              "dtype": args.dtype, "requests": args.num, "rows": rows}
    print(f"\n{report['date']}  {report['machine']}  (Ray num_cpus={args.num_cpus}, load avg {load_avg[0]:.2f})")
    print(f"{args.model} random-init={args.random_init} {args.dtype}, {args.num} requests; "
          f"{max(args.workers)} single-thread matmul processes ran {ceiling}x one (what the cores allow now)\n")
    print("| run | threads/worker | seconds | images/s | vs " + base["run"] + " | overhead/request under load (ms) "
          "| overhead one at a time (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['threads_per_worker']} | {r['seconds']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f}x | {r.get('overhead_under_load_ms_mean', '-')} | "
              f"{r.get('overhead_single_ms_median', '-')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
