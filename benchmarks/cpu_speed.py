"""CPU cost per image of the paged engine vs the reference loop, against the matmul peak, in one run.

Measures, side by side in one process (so a loaded box moves both alike):

- the fp32 (or the picked dtype's) matmul peak of this core, GFLOP/s of CPU time;
- the FLOP count of one image (``torch.utils.flop_counter`` over one reference image: linears,
  attention, VAE decode);
- engine and reference CPU seconds per image (``resource.getrusage``: user + sys) at each batch,
  the same requests and seeds, back to back; the engine is built outside the timed region
  (its build time is printed separately);
- engine / reference CPU ratio, fraction of the matmul peak the engine reaches
  (FLOP per image / engine CPU s per image / peak), and whether the tokens are identical.

    python -m benchmarks.cpu_speed --model var-tiny --batches 1 8 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from benchmarks.common import machine, today
from engine.api import EngineConfig, ImageEngine
from engine.models.registry import build_model
from engine.precision import resolve_dtype
from engine.reference import generate_reference
from engine.request import ImageRequest


def cpu_seconds() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn):
    """(result, user + sys CPU seconds, sys seconds, minor page faults) of ``fn()``."""
    u0, s0 = cpu_seconds()
    f0 = faults()
    out = fn()
    u1, s1 = cpu_seconds()
    return out, (u1 - u0) + (s1 - s0), s1 - s0, faults() - f0


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best GFLOP/s (per CPU second) of an n x n x n matmul."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(repeats):
        _, t, _, _ = timed(lambda: [torch.matmul(a, b, out=out) for _ in range(4)])
        best = max(best, 4 * 2 * n**3 / max(t, 1e-9) / 1e9)
    return best


def make_requests(model, n: int, offset: int = 0) -> list[ImageRequest]:
    spec = model.spec
    return [ImageRequest(class_label=(7 * i) % spec.var.num_classes, seed=1000 + i, cfg=spec.default_cfg,
                         top_k=spec.default_top_k, top_p=spec.default_top_p, request_id=f"c{i}")
            for i in range(offset, offset + n)]


def flops_per_image(model, dtype: str) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    reqs = make_requests(model, 1)
    with FlopCounterMode(display=False) as fc:
        generate_reference(model, reqs, dtype=dtype)
    by_op: dict[str, float] = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[-1] if "." in str(op) else str(op)
        by_op[name] = by_op.get(name, 0) + n
    total = float(fc.get_total_flops())
    conv = float(sum(v for k, v in by_op.items() if "conv" in k))
    attn = float(sum(v for k, v in by_op.items() if "attention" in k))
    linear = total - conv - attn
    if attn == 0:  # the CPU flash-attention op has no FLOP formula registered: count it here
        var = model.spec.var
        cum = 0
        for n in var.scale_lengths():
            cum += n
            attn += 2 * var.depth * 4 * n * cum * var.width  # CFG x layers x (QK^T + PV) x Lq x Lk x C
    return {"total": linear + conv + attn, "conv": conv, "attention": float(attn), "linear": linear}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="var-tiny")
    ap.add_argument("--random-init", action="store_true", help="random weights instead of the shipped ones")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                    help="float32 is what dtype=auto picks on AVX2 CPUs (the issue's machine)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the report to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, random_init=args.random_init)
    dtype = resolve_dtype(args.dtype, "cpu")
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    peak = matmul_peak(tdtype)
    fl = flops_per_image(model, dtype)
    print(json.dumps({"matmul_peak_gflops": round(peak, 1), "gflop_per_image": {k: round(v / 1e9, 2)
                                                                                 for k, v in fl.items()}}),
          flush=True)
    # warm-up both paths once (first-call allocations, oneDNN primitive caches)
    warm = make_requests(model, 2)
    generate_reference(model, warm, dtype=dtype)
    ImageEngine(model, EngineConfig(dtype=dtype)).generate(warm)
    rows = []
    for b in args.batches:
        row_peak = matmul_peak(tdtype)  # the box is shared: the peak next to each measurement
        reqs = make_requests(model, b)
        t0 = time.perf_counter()
        eng = ImageEngine(model, EngineConfig(dtype=dtype))
        build_s = time.perf_counter() - t0
        e_res, e_cpu, e_sys, e_flt = timed(lambda eng=eng, reqs=reqs: eng.generate(reqs))
        r_res, r_cpu, r_sys, r_flt = timed(lambda reqs=reqs: generate_reference(model, reqs, dtype=dtype))
        same = all(a.tokens == r.tokens for a, r in zip(e_res, r_res)) and all(a.ok for a in e_res)
        row = {
            "batch": b,
            "engine_cpu_s_per_image": round(e_cpu / b, 4),
            "reference_cpu_s_per_image": round(r_cpu / b, 4),
            "engine_over_reference": round(e_cpu / r_cpu, 3),
            "matmul_peak_gflops": round(row_peak, 1),
            "engine_fraction_of_peak": round(fl["total"] / (e_cpu / b) / 1e9 / row_peak, 3),
            "reference_fraction_of_peak": round(fl["total"] / (r_cpu / b) / 1e9 / row_peak, 3),
            "engine_sys_fraction": round(e_sys / e_cpu, 3),
            "reference_sys_fraction": round(r_sys / r_cpu, 3),
            "engine_faults_per_image": e_flt // b,
            "reference_faults_per_image": r_flt // b,
            "engine_build_s": round(build_s, 3),
            "tokens_identical": same,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    floor = fl["total"] / 1e9 / peak
    print(f"\nmachine: {machine()}; date: {today()}; {args.model} "
          f"({'random init' if args.random_init else 'shipped weights'}), dtype {args.dtype} -> {dtype}\n")
    print(f"matmul peak {peak:.1f} GFLOP/s at start (per row in the table); {fl['total'] / 1e9:.2f} GFLOP "
          f"per image (linear "
          f"{fl['linear'] / 1e9:.2f}, attention {fl['attention'] / 1e9:.2f}, VAE conv {fl['conv'] / 1e9:.2f}); "
          f"floor at that peak {floor:.3f} s per image\n")
    print("| batch | peak GFLOP/s | engine CPU s/img | reference CPU s/img | engine/reference | engine % of peak | "
          "reference % of peak | engine sys | tokens identical |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['matmul_peak_gflops']:.0f} | {r['engine_cpu_s_per_image']:.3f} | "
              f"{r['reference_cpu_s_per_image']:.3f} | "
              f"{r['engine_over_reference']:.2f} | {100 * r['engine_fraction_of_peak']:.0f}% | "
              f"{100 * r['reference_fraction_of_peak']:.0f}% | {100 * r['engine_sys_fraction']:.0f}% | "
              f"{r['tokens_identical']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "date": today(), "model": args.model, "dtype": dtype,
                       "matmul_peak_gflops": peak, "flops_per_image": fl, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
