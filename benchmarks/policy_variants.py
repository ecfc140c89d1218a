"""Paired fidelity of KV policy variants: PSNR of each variant's images vs the full cache, per seed.

Every variant generates the same requests (class i mod classes, seed ``seed + i``) as the
``full`` run; its per-seed PSNR is paired with the baseline variant's (default: the shipped
``scalekv``) and the table reports the mean PSNR, the mean paired difference to the baseline
with a 95% t interval, how many seeds the variant wins, and the peak KV bytes per request
relative to ``full`` (pool pages at the peak plus the current scale's scratch, as the engine
reports it).

A variant is a named policy plus ``EngineConfig`` overrides of its budget knobs (``drafter_mode``,
``num_drafters``) and selection knobs (``score_queries``, ``score``, ``pool_kernel``). Run from the repository root:

    python -m benchmarks.policy_variants --model var-tiny --budget 0.1 --num 48 --threads 1 \\
        --json out/policy_variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.api import EngineConfig, ImageEngine
from engine.config import DTYPES
from engine.models.registry import LoadedModel, build_model

from .common import machine, today
from .fidelity import make_requests, psnr
from .stats import paired_delta


@dataclass(frozen=True)
class Variant:
    label: str
    policy: str
    budget: dict = field(default_factory=dict)  # EngineConfig budget knobs (drafter_mode, num_drafters)
    select: dict = field(default_factory=dict)  # EngineConfig selection knobs (score_queries, score, pool_kernel)


VARIANTS: dict[str, Variant] = {v.label: v for v in [
    Variant("scalekv", "scalekv"),
    Variant("scalekv-fixed", "scalekv", budget={"drafter_mode": "fixed"}),
    Variant("scalekv-sticky", "scalekv", budget={"drafter_mode": "sticky"}),
    Variant("scalekv-logits", "scalekv", select={"score": "logits"}),
    Variant("scalekv-allq", "scalekv-allq"),  # all queries, calibrated drafters, no pooling
    Variant("scalekv-allq-fixed", "scalekv-allq", budget={"drafter_mode": "fixed"}),
    Variant("scalekv-allq-sticky", "scalekv-allq", budget={"drafter_mode": "sticky"}),
    Variant("scalekv-allq-fixed-pool5", "scalekv-allq", budget={"drafter_mode": "fixed"}, select={"pool_kernel": 5}),
    Variant("snapkv-allq", "snapkv", select={"score_queries": "all", "pool_kernel": 1}),
    Variant("h2o", "h2o"),
    Variant("snapkv", "snapkv"),
]}


def _run(model, requests, variant: Variant, kv_budget: float, base: EngineConfig) -> dict:
    cfg = replace(base, policy=variant.policy, kv_budget=kv_budget, **variant.budget, **variant.select)
    eng = ImageEngine(model, cfg)
    plan = eng.plan_for(variant.policy, kv_budget)
    t0 = time.perf_counter()
    results = eng.generate(requests)
    seconds = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{variant.label}: request {bad[0].request_id} failed: {bad[0].error}")
    return {"results": results, "seconds": seconds, "plan": plan,
            "kv_peak": float(np.mean([r.kv_peak_bytes for r in results]))}


def run_variants(model: LoadedModel, labels: list[str], kv_budget: float, num: int, seed: int,
                 baseline: str = "scalekv", base: EngineConfig | None = None) -> dict:
    base = base or EngineConfig(dtype="float32", block_size=16)
    requests = make_requests(model, num, seed)
    full = _run(model, requests, Variant("full", "full"), 1.0, base)
    rows = {}
    for label in labels:
        run = _run(model, requests, VARIANTS[label], kv_budget, base)
        per_seed = np.array([psnr(r.image, f.image) for r, f in zip(run["results"], full["results"])])
        plan = run["plan"]
        rows[label] = {"per_seed": per_seed, "seconds": run["seconds"], "kv_ratio": run["kv_peak"] / full["kv_peak"],
                       "drafters": [list(d) for d in plan.drafters], "kept": [list(k) for k in plan.kept]}
        print(f"{label:<26} PSNR {per_seed.mean():6.2f}  ({run['seconds']:.1f}s)", flush=True)
    ref = rows[baseline]["per_seed"] if baseline in rows else None
    out = []
    for label, r in rows.items():
        rec = {"variant": label, "policy": VARIANTS[label].policy, "budget_overrides": VARIANTS[label].budget,
               "select_overrides": VARIANTS[label].select, "psnr": float(r["per_seed"].mean()),
               "psnr_per_seed": [round(float(x), 4) for x in r["per_seed"]], "kv_ratio": r["kv_ratio"],
               "seconds": round(r["seconds"], 2), "drafters": r["drafters"], "kept": r["kept"]}
        if ref is not None:
            d = r["per_seed"] - ref
            ci = paired_delta(r["per_seed"], ref)
            rec.update(diff=ci.mean, diff_lo=ci.low, diff_hi=ci.high, wins=int((d > 0).sum()),
                       losses=int((d < 0).sum()))
        out.append(rec)
    return {"model": model.spec.name, "weights": model.source, "kv_budget": kv_budget, "num": num, "seed": seed,
            "baseline": baseline, "config": base.to_dict(), "machine": machine(), "date": today(), "results": out}


def format_table(report: dict) -> str:
    lines = [f"| variant | PSNR (dB) | diff vs {report['baseline']} [95% CI] | wins/losses | KV/full |",
             "|---|---|---|---|---|"]
    for r in report["results"]:
        diff = (f"{r['diff']:+.2f} [{r['diff_lo']:+.2f}, {r['diff_hi']:+.2f}]"
                if "diff" in r and not math.isnan(r["diff_lo"]) else "-")
        wl = f"{r['wins']}/{r['losses']}" if "wins" in r else "-"
        lines.append(f"| {r['variant']} | {r['psnr']:.2f} | {diff} | {wl} | {r['kv_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="var-tiny")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--num", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--baseline", default="scalekv")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute and K/V dtype (default auto: bf16 where the CPU has native bf16, else fp32)")
    p.add_argument("--json", default=None)
    p.add_argument("--checkpoint", default=None,
                   help="transformer weights (default: the model's shipped weights; var-deep has none yet)")
    p.add_argument("--tokenizer", default=None, help="tokenizer weights (with --checkpoint)")
    p.add_argument("--profile-path", default=None,
                   help="ScaleKV calibration profile (default: the model's shipped profile)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    labels = [v for v in a.variants.split(",") if v]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown} (available: {', '.join(VARIANTS)})")
    report = run_variants(build_model(a.model, a.checkpoint, a.tokenizer), labels, a.budget, a.num, a.seed,
                          a.baseline, EngineConfig(dtype=a.dtype, block_size=a.block_size,
                                                   profile_path=a.profile_path))
    print(f"\n{report['model']}, kv_budget {a.budget}, {a.num} seeds from {a.seed}, {report['machine']}, "
          f"{report['date']}")
    print(format_table(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
