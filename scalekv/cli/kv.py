"""``scalekv calibrate`` and ``scalekv bench fidelity``: the command line of the KV-memory work.

``engine/cli.py`` calls ``register(sub)`` once; everything else lives here so the main CLI
module stays small. ``bench`` may also be registered by other modules (e.g. a load test): we
reuse an existing ``bench`` parser and add ``fidelity`` to its sub-commands.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_FIDELITY_POLICIES = "full,scalekv,snapkv,pyramidkv,sliding,streaming,h2o"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    from memory.policies import POLICIES

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown policies {bad} (available: {', '.join(POLICIES)})")
    return names



def register(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` and ``bench fidelity`` to the ``scalekv`` parser's sub-commands."""
    from scalekv.cli import _add_model_args, bench_subcommands

    c = sub.add_parser("calibrate", help="measure drafter/refiner layers and write a scale profile (ScaleKV)")
    _add_model_args(c)
    c.add_argument("--num-requests", type=int, default=10, help="calibration requests (default 10)")
    c.add_argument("--num-drafters", type=int, default=None,
                   help="(layer, scale) pairs marked as drafters over all scales (default: scales - 1)")
    c.add_argument("--num-queries", type=int, default=64, help="sampled queries per (scale, layer) (default 64)")
    c.add_argument("--topk-ratio", type=float, default=0.1,
                   help="K' of the history top-K' ratio, as a fraction of the history (default 0.1)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True,
                   help="profile JSON to write (e.g. engine/models/weights/M/scale_profile.json)")
    c.set_defaults(func=cmd_calibrate)

    bsub = bench_subcommands(sub)
    f = bsub.add_parser("fidelity", help="fidelity of KV policies vs the full cache (PSNR, SSIM, tokens, memory)")
    _add_model_args(f)
    f.add_argument("--policies", type=_names, default=_names(DEFAULT_FIDELITY_POLICIES),
                   help=f"comma-separated policies (default {DEFAULT_FIDELITY_POLICIES})")
    f.add_argument("--kv-budget", type=float, default=0.1, help="kv budget (default 0.1)")
    f.add_argument("--budgets", type=_floats, default=None,
                   help="sweep of budgets, e.g. 0.1,0.2,0.4 (wins over --kv-budget)")
    f.add_argument("--num", type=int, default=8, help="requests (request i: class i mod classes, seed S+i)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    f.add_argument("--block-size", type=int, default=16)
    f.add_argument("--kv-pool-bytes", default="128MiB", help="fixed pool for the concurrency figure")
    f.add_argument("--profile-path", default=None, help="scale profile (default: the model's shipped one)")
    f.add_argument("--window-size", type=int, default=16)
    f.add_argument("--pool-kernel", type=int, default=5)
    f.add_argument("--pooling", default="max", choices=["max", "avg"])
    f.add_argument("--budget-delta", type=float, default=None)
    f.add_argument("--json", dest="json_out", default=None, help="write the report here")
    f.add_argument("--plot", default=None, help="folder for the grid PNGs and the budget sweep plot")
    f.set_defaults(func=cmd_fidelity)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from engine.calibrate import timed_calibrate
    from engine.models.registry import build_model
    from scalekv.cli import _set_threads

    _set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    prof, seconds = timed_calibrate(model, num_requests=args.num_requests, seed=args.seed,
                                    num_queries=args.num_queries, topk_ratio=args.topk_ratio,
                                    num_drafters=args.num_drafters)
    prof.save(args.out)
    drafters = {str(si): list(d) for si, d in enumerate(prof.drafters) if d}
    print(json.dumps({"model": prof.model, "out": args.out, "seconds": round(seconds, 2),
                      "drafters_per_scale": drafters}))
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from benchmarks.fidelity import FidelityConfig, format_table, run_fidelity, write_outputs
    from engine.api import _parse_bytes
    from engine.models.registry import build_model
    from scalekv.cli import _set_threads

    _set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    cfg = FidelityConfig(policies=args.policies, budgets=args.budgets or [args.kv_budget], num=args.num,
                         seed=args.seed, dtype=args.dtype, block_size=args.block_size,
                         kv_pool_bytes=_parse_bytes(args.kv_pool_bytes), profile_path=args.profile_path,
                         window_size=args.window_size, pool_kernel=args.pool_kernel, pooling=args.pooling,
                         budget_delta=args.budget_delta)
    report, images = run_fidelity(model, cfg, progress=sys.stderr.isatty())
    write_outputs(report, images, cfg, args.json_out, args.plot)
    print(format_table(report))
    return 0
