"""What HTTP costs over the Python API, and what previews cost (``benchmarks/RESULTS.md``).

One local Ray cluster (one CPU worker) with one ``scalekv serve`` app on loopback in front of
it; the same requests go through ``ClusterClient`` (``submit`` + results) and through HTTP:

1. latency per image, one request at a time (p50/mean over ``--num`` requests each, the two
   paths interleaved so drift hits both), and the overhead itself: client e2e minus the
   engine's own seconds for that image (robust to a shared machine's noisy engine time);
2. images/s at the same load: ``bench load``'s stream (``--load`` requests, ``--concurrency``
   in flight) through ``ClusterTarget`` and through ``HttpTarget``;
3. previews: the same request streamed with ``preview_every=1`` vs not streamed, and the
   engine's own decode time per preview (``num_previews`` / ``preview_seconds`` in its stats).

    PYTHONPATH=. python -m benchmarks.http_overhead --model var-tiny --num 10 --load 12 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_overhead")
    p.add_argument("--model", default="var-tiny")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--num", type=int, default=10, help="sequential requests per path")
    p.add_argument("--load", type=int, default=12, help="requests of the throughput run")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    p.add_argument("--kv-pool-bytes", default="128MiB")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import httpx
    import ray

    from benchmarks.common import machine, today
    from benchmarks.http_load import HttpTarget
    from benchmarks.load import ClusterTarget, LoadConfig, PolicySpec, run_load
    from engine.config import EngineConfig, parse_bytes
    from scheduler.client import ClusterClient, ensure_ray
    from scheduler.config import SchedulerConfig
    from scheduler.http import ServerThread, ServeSettings, create_app
    from workers.config import WorkerConfig

    engine = EngineConfig(dtype="float32", kv_pool_bytes=parse_bytes(args.kv_pool_bytes, "kv_pool_bytes"))
    ensure_ray(None, num_cpus=2)
    client = ClusterClient.start(SchedulerConfig(num_workers=1, worker=WorkerConfig(
        model=args.model, random_init=args.random_init, engine=engine, threads=args.threads)), detached=False)
    server = ServerThread(create_app(client, ServeSettings())).start()
    url = server.url
    out: dict = {"model": args.model, "machine": machine(), "date": today(), "worker_threads": args.threads,
                 "engine": engine.to_dict()}
    try:
        over: dict[str, list[float]] = {"python": [], "http": []}  # e2e minus the engine's own seconds

        def via_python(seed: int) -> float:
            t0 = time.perf_counter()
            res = client.run([{"class_label": 3, "seed": seed}], timeout=600)
            assert res[0]["ok"], res[0]["error"]
            dt = time.perf_counter() - t0
            over["python"].append(dt - float(res[0]["seconds"]))
            return dt

        def via_http(seed: int, stream: bool = False) -> float:
            t0 = time.perf_counter()
            body = {"prompt": "3", "seed": seed}
            if stream:
                with httpx.stream("POST", f"{url}/v1/images/generations", json={**body, "stream": True},
                                  timeout=600) as r:
                    assert r.status_code == 200
                    for _ in r.iter_lines():
                        pass
            else:
                r = http_client.post("/v1/images/generations", json=body)
                assert r.status_code == 200, r.text
                dt = time.perf_counter() - t0
                over["http"].append(dt - float(r.json()["data"][0]["scalekv"]["engine_seconds"]))
                return dt
            return time.perf_counter() - t0

        http_client = httpx.Client(base_url=url, timeout=600)  # one keep-alive connection, as an SDK holds
        via_python(1000)
        via_http(1001)  # warm both paths
        over["python"].clear()
        over["http"].clear()
        py, http, streamed = [], [], []
        for i in range(args.num):
            py.append(via_python(i))
            http.append(via_http(i))
        stats0 = client.worker_stats()
        for i in range(max(3, args.num // 2)):
            streamed.append(via_http(i, stream=True))
        stats1 = client.worker_stats()
        e0 = next(iter(stats0.values()))["engine"]
        e1 = next(iter(stats1.values()))["engine"]
        previews = e1["num_previews"] - e0["num_previews"]
        out["sequential"] = {
            "num": args.num,
            "python_p50_s": round(_p50(py), 4), "python_mean_s": round(statistics.mean(py), 4),
            "http_p50_s": round(_p50(http), 4), "http_mean_s": round(statistics.mean(http), 4),
            "http_minus_python_p50_s": round(_p50(http) - _p50(py), 4),
            "python_overhead_p50_s": round(_p50(over["python"]), 4),
            "http_overhead_p50_s": round(_p50(over["http"]), 4),
            "stream_p50_s": round(_p50(streamed), 4), "stream_num": len(streamed),
            "previews": previews,
            "preview_decode_s_each": round((e1["preview_seconds"] - e0["preview_seconds"]) / max(1, previews), 4),
        }
        cfg = LoadConfig(policies=[PolicySpec("full", 1.0)], num_requests=args.load, max_concurrency=args.concurrency,
                         seed=0, warmup=1, sample_interval_s=0.2)
        runs = {}
        for name, target in (("http", HttpTarget(url)),
                             ("submit", ClusterTarget("cluster", "local cluster", client=client))):
            rep = run_load(target, cfg)
            s = rep["runs"][0]["summary"]
            runs[name] = {"images_per_s": s["images_per_s"], "e2e_p50_s": s["e2e_s"]["p50"],
                          "e2e_p90_s": s["e2e_s"]["p90"], "ttfs_p50_s": s["ttfs_s"]["p50"],
                          "completed": s["completed"], "errors": s["errors"], "pool_usage_peak": s["pool_usage_peak"]}
        out["load"] = {"num_requests": args.load, "max_concurrency": args.concurrency, **runs}
    finally:
        server.stop()
        client.stop()
        ray.shutdown()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
