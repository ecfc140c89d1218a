"""Load test: one request stream, several KV policies side by side (``scalekv bench load``).

The design follows vLLM's serving benchmark (`vllm bench serve`), adapted to images:
open-loop arrivals at ``--request-rate`` R (Poisson, or gamma with ``--burstiness``; see
``benchmarks/arrivals.py``) and/or a client-side concurrency limit (``--max-concurrency`` C,
a semaphore: request i is sent when it has arrived *and* one of the C slots is free). Every
policy runs on the **same** stream (classes, image seeds, arrival times), one after the other,
in one invocation, so their figures differ only by the policy.

Targets:
- local engine (default): an in-process ``ImageEngine`` per policy with a fixed pool
  (``--kv-pool-bytes``). The driver adds the requests whose time has come, runs one
  ``step()``, records the pool and the requests running, and sleeps until the next arrival
  when the engine is idle. A request that arrives during a step is admitted after it, as in
  any iteration-level engine; its latency still counts from its arrival.
- a local cluster it starts (``--cluster-workers N``) or a running one (``--address A``),
  through ``scheduler.client.ClusterClient``: the requests due at each tick go as one job,
  each request naming the policy and budget; results are pulled with ``get_results``.

Per request (seconds, from the time the client *sent* it: its arrival, or later when it
waited for a concurrency slot): end-to-end latency (``e2e``: until the image was returned),
time to first scale (``ttfs``: until the first scale's step ended), time until admission.
Per run: images/s (ok images / time from the start of the stream to the last result),
latency mean/p50/p90/p99, requests running (peak, time-weighted mean), requests in the system,
pool usage over time (pages used, reserved, drafter/refiner pages after every step), peak KV
bytes measured by the pool (its high-water mark of pages in use, times the page size),
preemptions and errors. Between policies: ratios to a baseline (``full`` when it is one of
them, else the first policy), at each request rate.

Cluster runs differ in what can be measured: the pool time series comes from the
scheduler's status (worker snapshots refreshed at every worker poll, so coarser than a step),
the peak KV bytes from each worker pool's high-water mark when the run raised it, else the
sampled maximum (``kv_peak_source`` says which), and latencies from the scheduler's own
timestamps (submit to result), so the client's polling interval does not inflate them.

    scalekv bench load --model var-tiny --random-init --num-requests 24 --max-concurrency 16 \\
        --policy full --policy sliding --kv-budget 0.1 --kv-pool-bytes 32MiB --json out/load.json --plot out/load
"""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.arrivals import make_stream, with_rate
from benchmarks.load_records import (  # noqa: F401  (re-exported: the harness's public names)
    PERCENTILES,
    RATIO_FIELDS,
    REPORT_FIELDS,
    REQUEST_FIELDS,
    RUN_FIELDS,
    STAT_FIELDS,
    SUMMARY_FIELDS,
    TIMELINE_FIELDS,
    LoadConfig,
    PolicySpec,
    RequestRecord,
    RunResult,
    Timeline,
    _num,
    _records,
    _Sender,
    parse_policy,
    summarize,
)
from benchmarks.load_report import (  # noqa: F401
    _rate_str,
    format_table,
    plot_latency_cdf,
    plot_pool_usage,
    plot_throughput,
    write_outputs,
)
from benchmarks.load_runs import run_cluster, run_local  # noqa: F401


# --------------------------------------------------------------------------- the whole benchmark
def ratios(runs: list[dict], baseline: str) -> list[dict]:
    """Each policy's figures over the baseline's, at each request rate (None where undefined)."""
    out = []
    for rate in dict.fromkeys(r["request_rate"] for r in runs):
        at = {r["label"]: r["summary"] for r in runs if r["request_rate"] == rate}
        base = at.get(baseline)
        if base is None:
            continue
        for label, s in at.items():
            if label == baseline:
                continue
            rec = {"request_rate": rate, "label": label, "baseline": baseline}
            for k in RATIO_FIELDS:
                a, b = _ratio_value(s, k), _ratio_value(base, k)
                rec[k] = round(a / b, 4) if a is not None and b not in (None, 0) else None
            out.append(rec)
    return out


def _ratio_value(summary: dict, key: str) -> float | None:
    if key in ("e2e_p50", "ttfs_p50"):
        return summary[key.split("_")[0] + "_s"]["p50"]
    return summary[key]


def run_load(target, cfg: LoadConfig, progress: bool = False) -> dict:
    """Run every (request rate, policy) on the same stream against ``target`` (``LocalTarget``
    or ``ClusterTarget``) and return the report (see ``REPORT_FIELDS``)."""
    from tqdm import tqdm

    from benchmarks.common import machine, today

    num_classes = target.num_classes
    base = make_stream(cfg.num_requests, num_classes, cfg.request_rates[0], cfg.burstiness, cfg.seed,
                       cfg.normalize_arrivals)
    total = cfg.num_requests * len(cfg.policies) * len(cfg.request_rates)
    bar = tqdm(total=total, desc="bench load", unit="img", disable=not progress)
    runs, pool = [], None
    try:
        for rate in cfg.request_rates:
            stream = with_rate(base, rate, cfg.burstiness, cfg.seed, cfg.normalize_arrivals)
            for spec in cfg.policies:
                bar.set_postfix_str(f"{spec.label} at {_rate_str(rate)} req/s")
                n0 = bar.n
                res = target.run(spec, stream, rate, cfg, on_done=lambda: bar.update(1))
                bar.update(max(0, n0 + len(stream) - bar.n))  # a run that failed as a whole
                summary = summarize(res)
                runs.append({"label": spec.label, "policy": spec.policy, "kv_budget": spec.kv_budget,
                             "request_rate": _num(rate), "summary": summary,
                             "requests": [asdict(r) for r in res.requests], "timeline": asdict(res.timeline)})
                if pool is None or not pool["num_pages"]:
                    pool = {"num_pages": res.num_pages, "page_bytes": res.page_bytes,
                            "total_bytes": res.num_pages * res.page_bytes}
    finally:
        bar.close()
    labels = [p.label for p in cfg.policies]
    baseline = "full" if "full" in labels else labels[0]
    return {
        "model": target.model_name,
        "weights": target.weights,
        "mode": target.mode,
        "target": target.describe(),
        "machine": machine(),
        "date": today(),
        "config": cfg.to_dict(),
        "engine": target.engine_dict(),
        "pool": pool,
        "workload": {
            "num_requests": cfg.num_requests, "seed": cfg.seed, "burstiness": cfg.burstiness,
            "max_concurrency": cfg.max_concurrency, "request_rates": [_num(r) for r in cfg.request_rates],
            "requests": [r.to_dict() for r in base],
        },
        "runs": runs,
        "ratios": ratios(runs, baseline),
        "baseline": baseline,
    }


class LocalTarget:
    """The in-process engine: one fresh ``ImageEngine`` per run, all sharing ``model``."""

    mode = "local-engine"

    def __init__(self, model, engine_config) -> None:
        self.model = model
        self.engine_config = engine_config
        self.num_classes = model.spec.var.num_classes
        self.model_name = model.spec.name
        self.weights = getattr(model, "source", None)

    def describe(self) -> str:
        device = next(self.model.var.parameters()).device
        return f"in-process ImageEngine on {device}"

    def engine_dict(self) -> dict:
        return self.engine_config.to_dict()

    def run(self, spec, stream, rate, cfg, on_done=None) -> RunResult:
        return run_local(self.model, self.engine_config, spec, stream, rate, cfg, on_done)


class ClusterTarget:
    """A scalekv cluster through ``ClusterClient``: a running one (``client``), or one started
    afresh for every run by ``factory()`` and stopped after it (exact pool peaks per run)."""

    def __init__(self, mode: str, where: str, client=None, factory=None, engine_config=None,
                 model_name: str | None = None, num_classes: int | None = None) -> None:
        if (client is None) == (factory is None):
            raise ValueError("ClusterTarget: give a client or a factory")
        self.mode, self.where = mode, where
        self.client, self.factory = client, factory
        self.engine_config = engine_config
        self.info: dict = {}
        if client is not None:
            client.wait_ready()
            self.info = client.status().get("model") or {}
        self.model_name = model_name or self.info.get("model")
        self.num_classes = int(num_classes or self.info.get("num_classes") or 1)
        self.weights = None
        self._workers = None

    def describe(self) -> str:
        fresh = ", a fresh cluster per run" if self.factory is not None else ""
        return f"{self.where}: {self._workers} live worker(s){fresh}"

    def engine_dict(self) -> dict:
        if self.engine_config is not None:
            return self.engine_config.to_dict()
        return {k: self.info.get(k) for k in ("block_size", "page_bytes", "num_pages", "default_policy",
                                              "default_kv_budget")}

    def run(self, spec, stream, rate, cfg, on_done=None) -> RunResult:
        if self.client is not None:
            self._count(self.client)
            return run_cluster(self.client, spec, stream, rate, cfg, on_done)
        client = self.factory()
        try:
            self._count(client)
            return run_cluster(client, spec, stream, rate, cfg, on_done, fresh=True)
        finally:
            client.stop()

    def _count(self, client) -> None:
        self._workers = sum(w.get("state") == "alive" for w in client.status().get("workers", []))


