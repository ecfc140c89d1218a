"""``scalekv bench fidelity`` and ``scalekv bench load`` (the harnesses are in ``benchmarks/``)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from . import args as shared

DEFAULT_FIDELITY_POLICIES = "full,scalekv,scalekv-allq,snapkv-allq,snapkv,pyramidkv,sliding,streaming,h2o"

LOAD_HELP = """Load-test KV policies side by side on one request stream.

Arrivals: --request-rate R (open loop; Poisson, or gamma with --burstiness B: B < 1 burstier,
B > 1 smoother), --max-concurrency C (at most C requests in flight; alone it is a closed loop:
a request is sent as soon as a slot frees), or both. --request-rates R1,R2,... sweeps rates.
Every --policy (NAME or NAME@BUDGET, e.g. scalekv@0.1; the budget defaults to --kv-budget) runs
on the same stream (classes, image seeds, arrival times) against a pool of --kv-pool-bytes.

Target: the in-process engine (default), a local Ray cluster of --cluster-workers N started for
the run, a running cluster (--address; its own pool and engine knobs apply), or a `scalekv
serve` HTTP server (--endpoint URL, async httpx client, n=1 per request).
--goodput e2e:S ttfs:S adds images/s that met every SLO (seconds, as vllm bench serve).

Reports images/s, latency p50/p90/p99 (end to end and time to first scale), requests running
(peak, mean), peak KV bytes (the pool's high-water mark), pool usage over time, preemptions,
errors, and ratios to `full` (or the first policy). --report FILE writes everything (JSON),
--plot DIR the figures (pool usage over time, latency CDF, throughput vs request rate for a sweep).

example:
  scalekv bench load --model var-tiny --random-init --num-requests 24 --max-concurrency 16 \\
      --policy full --policy sliding --kv-budget 0.1 --kv-pool-bytes 32MiB --threads 1
"""


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in requests/s (or inf), got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (inf: all at once), got {text!r}")
    return v


def _rates(text: str) -> list[float]:
    return [_rate(x.strip()) for x in text.split(",") if x.strip()]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v



def register(sub: argparse._SubParsersAction) -> None:
    bench = shared.add_parser(sub, "bench", "benchmarks: KV policy fidelity, load tests")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    f = shared.add_parser(bsub, "fidelity", "fidelity of KV policies vs the full cache (PSNR, SSIM, tokens, memory)")
    shared.add_model_args(f)
    f.add_argument("--policies", type=shared.policy_list, default=DEFAULT_FIDELITY_POLICIES,
                   help="comma-separated policies")
    f.add_argument("--budgets", type=shared.float_list, default="0.04,0.1,0.2",
                   help="kv budgets to sweep (the ScaleKV paper's Table 1)")
    f.add_argument("--num", type=int, default=200,
                   help="requests per policy (request i: class i mod classes, seed S+i), the same for every policy")
    f.add_argument("--reference", default="scalekv",
                   help="paired per-seed deltas of every policy vs this one at the same budget ('none': no deltas)")
    f.add_argument("--confidence", type=float, default=0.95, help="level of the paired t-intervals")
    f.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="FID on the shape classifier's penultimate features (not Inception; no downloads)")
    f.add_argument("--fid-bootstrap", type=int, default=1000, metavar="B",
                   help="paired bootstrap resamples of the seeds for the FID-difference interval vs --reference "
                        "(0: no interval)")
    f.add_argument("--seed", type=int, default=0, help="seed S of the first request")
    f.add_argument("--plot", default=None, help="folder for the grid PNGs and the budget sweep plot")
    f.add_argument("--report", default=None, help="write the full report (JSON) to this file")
    shared.add_json(f, "the report")
    shared.add_threads(f)
    shared.add_engine_args(f, skip=("policy", "kv_budget", "max_running", "max_batch_tokens",
                                    "gpu_memory_utilization", "attention_backend"))
    f.set_defaults(func=cmd_fidelity)

    p = shared.add_parser(bsub, "load", "load test: policies side by side on one request stream (throughput, "
                                        "latency, KV memory, concurrency)", description=LOAD_HELP)
    shared.add_model_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None,
                       help="run against a running cluster: HOST:PORT, or 'state' (the one "
                            "`scalekv cluster start` recorded)")
    where.add_argument("--cluster-workers", type=int, default=None,
                       help="start a local Ray cluster with N workers for the run (default: in-process engine)")
    where.add_argument("--endpoint", default=None,
                       help="run against a `scalekv serve` HTTP server, e.g. http://127.0.0.1:8000 (async httpx "
                            "client; its cluster's pool and engine knobs apply)")
    p.add_argument("--cluster-name", default=None, help="scheduler name on the cluster (default: scalekv's)")
    p.add_argument("--api-key", default=None, help="--endpoint: bearer token (default: $SCALEKV_API_KEY)")
    a = p.add_argument_group("load")
    a.add_argument("--num-requests", type=int, default=32, help="requests per run")
    a.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="arrivals per second, Poisson/gamma (inf: all at once)")
    a.add_argument("--request-rates", type=_rates, default=None,
                   help="a sweep of rates, e.g. 0.5,1,2,inf (wins over --request-rate)")
    a.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 smoother")
    a.add_argument("--normalize-arrivals", action="store_true",
                   help="rescale the gaps so the last request arrives at exactly N/R seconds")
    a.add_argument("--max-concurrency", type=int, default=None, help="at most C requests in flight (client side)")
    a.add_argument("--seed", type=int, default=0, help="seed of the stream: classes, image seeds, arrivals")
    a.add_argument("--warmup", type=int, default=1,
                   help="requests run before each measured run (per worker on a cluster)")
    a.add_argument("--max-duration", type=_positive_float, default=None,
                   help="abort a run after this many seconds (its unfinished requests count as errors)")
    a.add_argument("--sample-interval", type=_positive_float, default=0.05,
                   help="cluster, endpoint: seconds between pool samples")
    a.add_argument("--goodput", nargs="+", default=None, metavar="SLO:SECONDS",
                   help="report goodput: images/s meeting every SLO, e.g. --goodput e2e:5 ttfs:0.5 "
                        "(as vllm bench serve, in seconds)")
    e = p.add_argument_group("policies")
    e.add_argument("--policy", dest="policies", action="append", default=None, metavar="NAME[@BUDGET]",
                   help="KV policy to run, repeatable (e.g. --policy full --policy scalekv@0.1; default full); "
                        "without @BUDGET the budget is --kv-budget")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: cuda when available; the pool then defaults to "
                        "--gpu-memory-utilization of free memory unless --kv-pool-bytes is given)")
    shared.add_threads(p)
    shared.add_engine_args(p, skip=("policy",))
    o = p.add_argument_group("output")
    o.add_argument("--report", default=None, help="write the full report (JSON) to this file")
    shared.add_json(o, "the report")
    o.add_argument("--plot", default=None, help="folder for the PNG plots")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_load)


def cmd_fidelity(args: argparse.Namespace) -> int:
    from benchmarks.fidelity import FidelityConfig, format_table, run_fidelity, write_outputs
    from engine.config import EngineConfig
    from engine.models.registry import build_model

    ecfg = EngineConfig.from_values({**vars(args), "kv_pool_bytes": args.kv_pool_bytes or 128 << 20})
    shared.set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    cfg = FidelityConfig(policies=args.policies, budgets=args.budgets, num=args.num, seed=args.seed,
                         engine=ecfg,
                         reference=None if args.reference == "none" else args.reference, confidence=args.confidence,
                         fid=args.fid, fid_bootstrap=args.fid_bootstrap)
    report, images = run_fidelity(model, cfg, progress=sys.stderr.isatty() and not args.json)
    write_outputs(report, images, cfg, args.report, args.plot)
    print(json.dumps(report, default=str) if args.json else format_table(report))
    return 0


def load_config(args: argparse.Namespace):
    from benchmarks.load import LoadConfig, parse_policy
    from engine.config import EngineConfig

    default_budget = EngineConfig.from_values(vars(args)).kv_budget if args.kv_budget is None else args.kv_budget
    specs = [parse_policy(t, default_budget) for t in (args.policies or ["full"])]
    return LoadConfig(policies=specs, num_requests=args.num_requests,
                      request_rates=args.request_rates or [args.request_rate], burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, seed=args.seed,
                      normalize_arrivals=args.normalize_arrivals, warmup=args.warmup,
                      max_duration_s=args.max_duration, sample_interval_s=args.sample_interval)


def engine_config(args: argparse.Namespace):
    """The engine knobs (flags > SCALEKV_* environment > defaults); policy and budget are per run."""
    from engine.config import EngineConfig

    return EngineConfig.from_values({**vars(args), "policy": None, "kv_budget": None})


def cmd_load(args: argparse.Namespace) -> int:
    from benchmarks.load import LocalTarget, format_table, run_load, write_outputs

    try:
        cfg = load_config(args)
        ecfg = engine_config(args)
    except ValueError as e:
        print(f"scalekv bench load: error: {e}", file=sys.stderr)
        return 2
    from benchmarks.http_load import apply_goodput, format_extras, parse_goodput

    try:
        slos = parse_goodput(args.goodput)
    except ValueError as e:
        print(f"scalekv bench load: error: {e}", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    shared.set_threads(args.threads)
    if args.endpoint is not None:
        import os

        from benchmarks.http_load import HttpTarget

        try:
            target = HttpTarget(args.endpoint, args.api_key or os.environ.get("SCALEKV_API_KEY"))
        except Exception as e:  # refused, 401, not a scalekv server
            print(f"scalekv bench load: error: {args.endpoint}: {e}", file=sys.stderr)
            return 2
        report = run_load(target, cfg, progress)
    elif args.address is None and args.cluster_workers is None:
        from engine.models.registry import build_model

        model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init,
                            device=_device(args.device))
        report = run_load(LocalTarget(model, ecfg), cfg, progress)
    else:
        report = _run_on_cluster(args, cfg, ecfg, progress)
        if report is None:
            return 2
    extras = format_extras(apply_goodput(report, slos))  # also notes runs capped by --max-concurrency
    written = write_outputs(report, args.report, args.plot)
    text = format_table(report) + (f"\n{extras}" if extras else "")
    print(json.dumps(report, default=str) if args.json else text, flush=True)
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return 1 if any(r["summary"]["errors"] for r in report["runs"]) else 0


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scalekv bench load: error: --device cuda but torch sees no CUDA device")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def _run_on_cluster(args: argparse.Namespace, cfg, ecfg, progress: bool) -> dict | None:
    import itertools
    import os

    from benchmarks.load import ClusterTarget, run_load
    from scheduler.client import ClusterClient
    from scheduler.config import SchedulerConfig

    if args.address is not None:
        if args.kv_pool_bytes is not None:
            print("scalekv bench load: note: --kv-pool-bytes and other engine flags do not apply to a running "
                  "cluster (its workers' pools are used)", file=sys.stderr)
        try:
            client = ClusterClient.connect(None if args.address == "state" else args.address,
                                           name=args.cluster_name)
        except ConnectionError as e:
            print(f"scalekv bench load: error: {e}", file=sys.stderr)
            return None
        return run_load(ClusterTarget("cluster", f"cluster at {args.address}", client=client), cfg, progress)

    import ray

    from engine.models.registry import get_spec
    from workers.config import WorkerConfig

    if args.cluster_workers < 1:
        print("scalekv bench load: error: --cluster-workers must be >= 1", file=sys.stderr)
        return None
    started_ray = not ray.is_initialized()
    wcfg = WorkerConfig(model=args.model, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                        random_init=args.random_init, engine=ecfg, threads=args.threads, device=args.device)
    base = args.cluster_name or f"scalekv-bench-{os.getpid()}"
    count = itertools.count()

    def fresh_cluster():  # a new scheduler and workers (fresh pools) for every run, on one Ray instance
        name = f"{base}-{next(count)}"
        return ClusterClient.start(SchedulerConfig(name=name, num_workers=args.cluster_workers, worker=wcfg),
                                   detached=False)

    target = ClusterTarget("local-cluster", f"local Ray cluster, {args.cluster_workers} worker(s)",
                           factory=fresh_cluster, engine_config=ecfg, model_name=args.model,
                           num_classes=get_spec(args.model).var.num_classes)
    try:
        return run_load(target, cfg, progress)
    finally:
        if started_ray:
            ray.shutdown()
