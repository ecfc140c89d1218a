"""``scalekv plan``: capacity planning (KV bytes, pool pages, concurrent requests, roofline).

No torch and no weights: shapes come from ``engine.shapes``, the arithmetic from
``memory.planner`` (the page math is the memory manager's own). Every list-valued flag
(``--models``, ``--devices``; ``--policies`` and
``--budgets`` comma-separated, as in ``bench fidelity``) takes several values and the command
prints one row per combination (``full`` once per model and device, whatever the budgets).

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from engine.config import EngineConfig, parse_bytes
from memory.policy_names import PLAN_KINDS

from . import args as shared


def _default(name: str):
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)


def register(sub: argparse._SubParsersAction) -> None:
    from engine.shapes import model_shapes
    from memory.planner import DEVICES, DTYPE_BYTES

    p = shared.add_parser(sub, "plan", "capacity planning: KV memory per request, concurrent requests a device's "
                                       "pool admits, roofline images/s (no GPU needed)",
                          description=__doc__)
    p.add_argument("--models", nargs="+", default=["infinity-2b"], choices=sorted(model_shapes()), metavar="MODEL",
                   help=f"models to plan ({', '.join(sorted(model_shapes()))})")
    p.add_argument("--devices", nargs="+", default=["h100-80gb"], choices=sorted(DEVICES),
                   help="device presets (memory as CUDA reports it, dense bf16 FLOP/s, HBM bandwidth)")
    p.add_argument("--device-memory", type=lambda s: parse_bytes(s, "device_memory"), default=None,
                   help="override the device memory, e.g. 80GiB")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s, e.g. 989e12")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="override the memory bandwidth in bytes/s, e.g. 3.35e12")
    p.add_argument("--policies", type=shared.policy_list, default="full,scalekv", help="comma-separated KV policies")
    p.add_argument("--budgets", type=shared.float_list, default="0.1",
                   help="kept fractions for compressing policies; Infinity at 1024 px 1:1 uses the released "
                        "token budgets (0.04: 265, 0.1: 650, 0.2: 1300 tokens per layer)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per scale step for the roofline and the batch KV figure (default: the pool's "
                        "concurrency limit)")
    p.add_argument("--resolution", type=int, default=None, help="pixels of the square schedule (default: the "
                                                                "model's largest)")
    p.add_argument("--aspect", default="1:1", help="aspect ratio height:width (Infinity: 1:1, 5:4, 4:3, 3:2, 7:4, "
                                                   "2:1, 5:2, 3:1 and their inverses)")
    p.add_argument("--k-dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="dtype of cached K (default: the model's; Infinity float32, as under autocast)")
    p.add_argument("--v-dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="dtype of cached V (default: the model's; Infinity bfloat16)")
    p.add_argument("--weight-dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="dtype of the weights")
    p.add_argument("--block-size", type=int, default=_default("block_size"), help="tokens per KV page")
    p.add_argument("--window-size", type=int, default=_default("window_size"),
                   help="refiners keep at least this many tokens (scalekv)")
    p.add_argument("--budget-delta", type=float, default=None, help="scalekv: refiner budget decay per scale")
    p.add_argument("--gpu-memory-utilization", type=float, default=_default("gpu_memory_utilization"),
                   help="fraction of the memory left after the weights given to the pool")
    p.add_argument("--reserve-bytes", type=lambda s: parse_bytes(s, "reserve_bytes"), default=0,
                   help="memory kept off the pool besides the weights (CUDA context, activations), e.g. 2GiB")
    p.add_argument("--kv-pool-bytes", type=lambda s: parse_bytes(s, "kv_pool_bytes"), default=None,
                   help="size the pool directly instead of from the device memory")
    p.add_argument("--max-batch-tokens", type=int, default=_default("max_batch_tokens"),
                   help="tokens per engine step (for the activation estimate)")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens per row (Infinity; default 64)")
    p.add_argument("--profile-path", default=None,
                   help="scale profile for scalekv (default: the model's shipped one; Infinity: the released "
                        "budgets, see `scalekv profile import`)")
    p.add_argument("--paper-table", action="store_true",
                   help="print the analytic KV table at --batch images (default 8) in the ScaleKV paper's "
                        "convention instead of planning")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    shared.add_json(p, "one record per row")
    p.set_defaults(func=cmd_plan)


def _device(args: argparse.Namespace, name: str):
    from memory.planner import DEVICES

    dev = DEVICES[name]
    return dataclasses.replace(
        dev, memory_bytes=args.device_memory or dev.memory_bytes, peak_flops=args.peak_flops or dev.peak_flops,
        bandwidth=args.bandwidth or dev.bandwidth)


def _rows(args: argparse.Namespace) -> list:
    from engine.shapes import default_profile, get_shape
    from memory.planner import plan_capacity
    from memory.profile import ScaleProfile

    out = []
    for model in args.models:
        shape = get_shape(model)
        profile = None
        if "scalekv" in args.policies:
            profile = ScaleProfile.load(args.profile_path) if args.profile_path else default_profile(model)
        for dev_name in args.devices:
            device = _device(args, dev_name)
            combos = []
            for policy in args.policies:
                if PLAN_KINDS[policy] == "full":
                    combos.append((policy, 1.0))
                else:
                    combos.extend((policy, b) for b in args.budgets)
            for policy, budget in combos:
                if PLAN_KINDS[policy] == "scalekv" and profile is None:
                    print(f"note: {model} has no scale profile, no scalekv rows (pass --profile-path)", file=sys.stderr)
                    continue
                out.append(plan_capacity(
                    shape, device, policy, budget, batch=args.batch, resolution=args.resolution, aspect=args.aspect,
                    k_dtype=args.k_dtype, v_dtype=args.v_dtype, block_size=args.block_size,
                    window_size=args.window_size, delta=args.budget_delta,
                    profile=profile if PLAN_KINDS[policy] == "scalekv" else None,
                    gpu_memory_utilization=args.gpu_memory_utilization, reserve_bytes=args.reserve_bytes,
                    weight_dtype=args.weight_dtype, kv_pool_bytes=args.kv_pool_bytes,
                    max_batch_tokens=args.max_batch_tokens, text_tokens=args.text_tokens))
    return out


COLUMNS = ("model", "device", "policy", "budget", "KV MiB/req (analytic)", "reserved MiB/req", "pages/req",
           "pool GiB", "max concurrent", "roofline img/s")


def _cells(r) -> list[str]:
    budget = "-" if r.budget_tokens is None else f"{r.kv_budget:g} ({r.budget_tokens} tok)"
    roof = r.roofline
    return [r.model, r.device, r.policy, budget, f"{r.analytic_bytes_per_request / 2**20:,.1f}",
            f"{r.reserved_bytes_per_request / 2**20:,.1f}", f"{r.request_pages:,}", f"{r.pool_bytes / 2**30:,.1f}",
            f"{r.max_concurrent_requests:,}", f"{roof['images_per_s']:g} ({roof['bound']}, b{roof['batch']})"]


def _table(header, rows, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows])


def cmd_plan(args: argparse.Namespace) -> int:
    if args.paper_table:
        return _paper_table(args)
    rows = _rows(args)
    if args.json:
        for r in rows:
            print(json.dumps(r.to_dict()))
        return 0
    print(_table(COLUMNS, [_cells(r) for r in rows], args.markdown))
    if not args.markdown:
        r = rows[0]
        print(f"\nK {r.k_dtype} + V {r.v_dtype}, block {r.block_size}; {r.resolution} px {r.aspect}, {r.num_scales} "
              f"scales; pool = {args.gpu_memory_utilization:g} x (device - weights {r.weight_bytes / 2**30:.1f} GiB"
              f" - reserve); step activations ~{r.step_activation_bytes / 2**30:.2f} GiB vs "
              f"{r.activation_slack_bytes / 2**30:.2f} GiB left off the pool")
    for r in rows:
        if r.page_fill_budget is not None:
            print(f"note: {r.model} {r.policy} at {r.kv_budget:g} keeps {r.budget_tokens} tokens a layer in whole "
                  f"pages of {r.block_size}; budget {r.page_fill_budget:g} keeps {r.page_fill_tokens} in the "
                  f"same {r.request_pages} pages a request", file=sys.stderr)
        if r.step_activation_bytes > r.activation_slack_bytes:
            print(f"warning: {r.model} on {r.device}: step activations (~{r.step_activation_bytes / 2**30:.2f} GiB) "
                  f"exceed the memory left off the pool ({r.activation_slack_bytes / 2**30:.2f} GiB); raise "
                  "--reserve-bytes", file=sys.stderr)
    return 0


def _paper_table(args: argparse.Namespace) -> int:
    from engine.shapes import get_shape
    from memory.planner import paper_memory_table

    batch = args.batch or 8
    tables = {m: paper_memory_table(get_shape(m), batch, args.k_dtype, args.v_dtype) for m in args.models}
    if args.json:
        print(json.dumps({"batch": batch, "mib": tables}))
        return 0
    keys = list(dict.fromkeys(k for t in tables.values() for k in t))
    rows = [[m, *(f"{t[k]:,}" if k in t else "-" for k in keys)] for m, t in tables.items()]
    print(_table([f"KV MiB, batch {batch} (x2 CFG rows)", *keys], rows, args.markdown))
    return 0
