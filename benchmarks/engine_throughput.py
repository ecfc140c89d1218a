"""Engine vs reference loop throughput on the same requests, and pool waste under a mixed load.

The reference loop serves requests in fixed batches (``--reference-batch``, 1 = one request at a
time); the engine gets every request at once and batches across requests and scales. Pool waste
is measured per request at its peak: 1 - (tokens stored / slots reserved).

    python -m benchmarks.engine_throughput --model var-tiny --num 16 --reference-batch 1 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import machine, today
from engine.api import EngineConfig, ImageEngine
from engine.models.registry import build_model
from engine.reference import generate_reference
from engine.request import ImageRequest


def make_requests(model, n: int) -> list[ImageRequest]:
    spec = model.spec
    return [ImageRequest(class_label=(7 * i) % spec.var.num_classes, seed=1000 + i, cfg=spec.default_cfg,
                              top_k=spec.default_top_k, top_p=spec.default_top_p, request_id=f"b{i}")
            for i in range(n)]


def run_engine(model, reqs, cfg: EngineConfig, stagger: int = 0) -> dict:
    """Submit ``stagger`` requests per step (0 = all at once); returns throughput and waste."""
    eng = ImageEngine(model, cfg)
    pending, results, t0 = list(reqs), [], time.perf_counter()
    running_peak = 0
    while pending or eng.has_unfinished():
        take = len(pending) if stagger == 0 else stagger
        for r in pending[:take]:
            eng.add_request(r)
        pending = pending[take:]
        running_peak = max(running_peak, eng.num_running)
        results += eng.step()
    dt = time.perf_counter() - t0
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    slots = sum(r.stats["pages_reserved"] * cfg.block_size for r in results)
    stored = sum(r.stats["tokens_peak"] for r in results)
    return {"seconds": dt, "images_per_s": len(reqs) / dt, "steps": eng.num_steps, "running_peak": running_peak,
            "pool_waste": 1 - stored / slots, "free_after": eng.pool.num_free == eng.pool.num_pages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="var-tiny")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--reference-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--kv-pool-bytes", type=int, default=1 << 30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, random_init=True)
    reqs = make_requests(model, args.num)
    generate_reference(model, reqs[:1], dtype=args.dtype)  # warm-up
    rows = {}
    for b in args.reference_batch:
        t0 = time.perf_counter()
        for i in range(0, len(reqs), b):
            generate_reference(model, reqs[i : i + b], dtype=args.dtype)
        rows[f"reference_b{b}"] = len(reqs) / (time.perf_counter() - t0)
        print(json.dumps({f"reference_b{b}_images_per_s": rows[f'reference_b{b}']}), flush=True)
    cfg = EngineConfig(dtype=args.dtype, kv_pool_bytes=args.kv_pool_bytes)
    eng = run_engine(model, reqs, cfg)
    print(json.dumps({"engine": eng}), flush=True)
    mixed = run_engine(model, reqs, cfg, stagger=2)
    print(json.dumps({"engine_staggered": mixed}), flush=True)
    print(f"\nmachine: {machine()}; date: {today()}; {args.model} random init, {args.dtype}, {args.num} images\n")
    print("| run | images/s | engine / this |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {eng['images_per_s'] / v:.2f}x |")
    print(f"| engine (all at once) | {eng['images_per_s']:.3f} | 1.00x |")
    print(f"| engine (2 arrivals per step) | {mixed['images_per_s']:.3f} | - |")
    print(f"\npool waste (1 - stored/reserved slots at each request's peak), staggered load: "
          f"{100 * mixed['pool_waste']:.2f}%; all pages free after: {mixed['free_after']}")


if __name__ == "__main__":
    main()
