"""One-command device check of the engine on a GPU (sized for <= 8 minutes of an H200).

    python -m benchmarks.gpu_check                        # on the device, writes $OUT/gpu_check.json
    python -m benchmarks.gpu_check --device cpu --quick   # dry run of every section on CPU

Sections (each guarded: a failing one is recorded in the report and the rest still run; a
global time budget skips what would not fit):

1. ``backends``: paged attention of every available backend (torch SDPA, varlen, xformers,
   FlashInfer over written pages) vs fp32 dense attention at engine shapes (var-tiny and
   var-d16 heads/head_dim, mixed history lengths), bf16 and fp32.
2. ``tokens``: engine vs reference tokens on the device (fp32 with TF32 off, and bf16), and
   the device fp32 engine tokens vs the CPU fp32 tokens committed in
   ``benchmarks/cpu_tokens_var_tiny.json`` (``--write-cpu-tokens`` regenerates that file on CPU).
3. ``syncs``: host-device syncs per image (``torch.cuda.set_sync_debug_mode("warn")``).
4. ``busy``: GPU busy fraction of one profiled engine step (kernel time / step wall time).
5. ``throughput``: images/s of the engine and the reference at batch 1, 8, 32, 64, 128 on
   var-tiny (shipped weights) and var-d16 (random init).
6. ``compression``: full vs scalekv at kv_budget 0.1 under a pool that binds full.
7. ``worker``: the in-process ``workers.worker.Worker`` (no Ray; metrics off) serving a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.common import machine, today
from engine.api import EngineConfig, ImageEngine
from engine.models.registry import build_model
from engine.reference import generate_reference
from engine.request import ImageRequest

CPU_TOKENS = Path(__file__).with_name("cpu_tokens_var_tiny.json")
CPU_TOKEN_REQUESTS = 4


def make_requests(model, n: int, offset: int = 0, prefix: str = "g") -> list[ImageRequest]:
    spec = model.spec
    return [ImageRequest(class_label=(7 * i) % spec.var.num_classes, seed=1000 + i, cfg=spec.default_cfg,
                         top_k=spec.default_top_k, top_p=spec.default_top_p, request_id=f"{prefix}{i}")
            for i in range(offset, offset + n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_config(model, batch: int, dtype: str, **kw) -> EngineConfig:
    last = model.spec.var.scale_lengths()[-1]
    return EngineConfig(dtype=dtype, max_running=max(batch, 1), max_batch_tokens=max(2 * batch * last, 2 * last),
                        **kw)


# --------------------------------------------------------------------------- sections
def check_backends(device: str, quick: bool) -> dict:
    from memory.attention import (
        FlashInferPaged,
        attend_paged_written,
        dense_attention,
        flashinfer_available,
        paged_attention,
        varlen_available,
        write_kv,
        xformers_available,
    )
    from memory.pool import KVPool

    out = {"available": {"varlen": varlen_available(device), "xformers": xformers_available(),
                         "flashinfer": flashinfer_available()}, "cases": []}
    shapes = [("var-tiny", 4, 64)] + ([] if quick else [("var-d16", 16, 64)])
    rng = random.Random(0)
    for name, h, d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            s, lq, bs = (4, 16, 16) if quick else (16, 169, 16)
            hists = ([40] * 4, [40, 17, 33, 0]) if quick else ([424] * s, [rng.randrange(0, 425) for _ in range(s)])
            for hist in hists:
                pool = KVPool(s * (-(-(max(hist) + lq) // bs)) + 4, bs, h, d, dtype=dtype, device=device)
                g = torch.Generator(device="cpu").manual_seed(1)
                q, kc, vc = (torch.randn(s, h, lq, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
                khs = [torch.randn(n, h, d, generator=g).to(device=device, dtype=dtype) for n in hist]
                vhs = [torch.randn(n, h, d, generator=g).to(device=device, dtype=dtype) for n in hist]
                pages = []
                for i, n in enumerate(hist):
                    p = pool.allocate(-(-(n + lq) // bs))
                    write_kv(pool, p, khs[i], vhs[i])
                    pages.append(p)
                width = max(len(p) for p in pages)
                table = torch.tensor([p + [0] * (width - len(p)) for p in pages], device=device)
                want = torch.stack([
                    dense_attention(q[i:i + 1], torch.cat([khs[i].transpose(0, 1)[None], kc[i:i + 1]], 2),
                                    torch.cat([vhs[i].transpose(0, 1)[None], vc[i:i + 1]], 2), 0.125)[0]
                    for i in range(s)])
                case = {"model": name, "dtype": str(dtype).split(".")[-1], "hist": "equal" if len(set(hist)) == 1
                        else "mixed", "max_abs_err": {}}
                for backend in ("torch", "varlen", "xformers"):
                    if backend != "torch" and not out["available"][backend]:
                        continue
                    if backend == "xformers" and not device.startswith("cuda"):
                        continue
                    got = paged_attention(q, kc, vc, pool, table, hist, 0.125, backend)
                    case["max_abs_err"][backend] = float((got.float() - want).abs().max())
                if len(set(hist)) == 1:  # the written path: current tokens stored first
                    for i in range(s):
                        write_kv(pool, pages[i], kc[i].transpose(0, 1), vc[i].transpose(0, 1), start=hist[i])
                    n_pg = -(-(hist[0] + lq) // bs)
                    ids = table[:, :n_pg].long()
                    got = attend_paged_written(q, pool, ids, hist[0] + lq, 0.125)
                    case["max_abs_err"]["torch_written"] = float((got.float() - want).abs().max())
                    fi = FlashInferPaged.create(torch.device(device), pool)
                    if fi is not None and fi.supports(q):
                        meta = (torch.arange(s + 1, dtype=torch.int32) * lq,
                                torch.arange(s + 1, dtype=torch.int32) * n_pg, ids.reshape(-1).int().cpu(),
                                torch.full((s,), hist[0] + lq - (n_pg - 1) * bs, dtype=torch.int32))
                        got = fi.attend(q, pool, meta, 0.125)
                        case["max_abs_err"]["flashinfer"] = float((got.float() - want).abs().max())
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                case["ok"] = all(v <= tol for v in case["max_abs_err"].values())
                out["cases"].append(case)
    out["ok"] = all(c["ok"] for c in out["cases"])
    return out


def tokens_of(results) -> list[list[int]]:
    return [r.tokens for r in results]


def check_tokens(device: str, quick: bool) -> dict:
    model = build_model("var-tiny", device=device)
    reqs = make_requests(model, CPU_TOKEN_REQUESTS)
    out: dict = {}
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16" and device == "cpu" and quick:
            continue  # AVX2 CPUs run bf16 matmuls 20-70x slower; the device runs it
        eng = tokens_of(ImageEngine(model, EngineConfig(dtype=dtype)).generate(reqs))
        ref = tokens_of(generate_reference(model, reqs, dtype=dtype))
        out[dtype] = {"engine_equals_reference": eng == ref,
                      "token_agreement": agreement(eng, ref)}
        if dtype == "float32" and CPU_TOKENS.exists():
            cpu = json.loads(CPU_TOKENS.read_text())["tokens"]
            out[dtype]["engine_equals_cpu_fp32"] = eng == cpu
            out[dtype]["agreement_with_cpu_fp32"] = agreement(eng, cpu)
            # the first scales decide the image; report where the first difference is
            out[dtype]["first_diff_position"] = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
                                                 for x, y in zip(eng, cpu)]
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(len(r) for r in a)
    return round(same / max(total, 1), 4)


def check_syncs(device: str, quick: bool) -> dict:
    model = build_model("var-tiny", device=device)
    n = 4 if quick else 16
    eng = ImageEngine(model, engine_config(model, n, "auto"))
    eng.generate(make_requests(model, 2, prefix="w"))
    if not device.startswith("cuda"):
        counts = {"tolist": 0, "item": 0, "cpu": 0}
        real = {k: getattr(torch.Tensor, k) for k in counts}

        def wrap(name):
            def f(self, *a, **kw):
                counts[name] += 1
                return real[name](self, *a, **kw)
            return f

        try:
            for k in counts:
                setattr(torch.Tensor, k, wrap(k))
            eng.generate(make_requests(model, n))
        finally:
            for k, f in real.items():
                setattr(torch.Tensor, k, f)
        return {"method": "counted tolist/item/cpu (CPU dry run)", "per_image": sum(counts.values()) / n,
                "steps": eng.num_steps, "counts": counts}
    sync(device)
    steps0 = eng.num_steps
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng.generate(make_requests(model, n))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    msgs = [str(x.message) for x in w if "synchroniz" in str(x.message).lower()]
    return {"method": "torch.cuda.set_sync_debug_mode('warn')", "per_image": len(msgs) / n,
            "per_step": len(msgs) / max(eng.num_steps - steps0, 1), "examples": sorted(set(m[:160] for m in msgs))[:5]}


def check_busy(device: str, quick: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = build_model("var-tiny", device=device)
    n = 4 if quick else 32
    eng = ImageEngine(model, engine_config(model, n, "auto"))
    for r in make_requests(model, n):
        eng.add_request(r)
    for _ in range(model.spec.var.num_scales - 2):  # run up to the second-to-last (large) scale
        eng.step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        eng.step()
        sync(device)
        wall = time.perf_counter() - t0
    while eng.has_unfinished():
        eng.step()
    if not device.startswith("cuda"):
        return {"step_wall_s": round(wall, 4), "busy_fraction": None, "note": "no CUDA activity on CPU"}
    kernel_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    launches = sum(1 for e in prof.events() if e.name in launch_names)
    return {"step_wall_s": round(wall, 4), "kernel_s": round(kernel_us / 1e6, 4),
            "busy_fraction": round(kernel_us / 1e6 / wall, 3), "kernel_launches": launches}


def check_throughput(device: str, quick: bool, batches: list[int], models: list[str], budget_end: float) -> dict:
    out = []
    for name in models:
        model = build_model(name, device=device, random_init=name != "var-tiny")
        dtype = "auto"
        generate_reference(model, make_requests(model, 1), dtype=dtype)  # warm-up
        ImageEngine(model, engine_config(model, 2, dtype)).generate(make_requests(model, 2, prefix="w"))
        for b in batches:
            if time.monotonic() > budget_end:
                out.append({"model": name, "batch": b, "skipped": "time budget"})
                continue
            reqs = make_requests(model, b)
            eng = ImageEngine(model, engine_config(model, b, dtype))
            sync(device)
            t0 = time.perf_counter()
            res = eng.generate(reqs)
            sync(device)
            te = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = generate_reference(model, reqs, dtype=dtype)
            sync(device)
            tr = time.perf_counter() - t0
            row = {"model": name, "batch": b, "dtype": eng.dtype, "engine_images_per_s": round(b / te, 3),
                   "reference_images_per_s": round(b / tr, 3), "engine_over_reference": round(tr / te, 3),
                   "tokens_agreement": agreement(tokens_of(res), tokens_of(ref))}
            out.append(row)
            print(json.dumps(row), flush=True)
            del eng
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"rows": out}


def check_compression(device: str, quick: bool) -> dict:
    model = build_model("var-tiny", device=device)
    n = 8 if quick else 128
    spec = model.spec
    from memory.manager import full_plan
    from memory.pool import KVPool

    kv = torch.bfloat16 if (device.startswith("cuda")) else torch.float32
    page = KVPool.bytes_per_page(16, spec.var.num_heads, spec.var.head_dim, kv)
    full_req = 2 * full_plan(spec.var.scale_lengths(), spec.var.depth).peak_pages(16) * page
    pool_bytes = full_req * max(n // 8, 1)  # full fits n/8 requests at once
    rows = {}
    for policy, budget in (("full", 1.0), ("scalekv", 0.1)):
        cfg = engine_config(model, n, "auto", policy=policy, kv_budget=budget, kv_pool_bytes=pool_bytes)
        eng = ImageEngine(model, cfg)
        reqs = make_requests(model, n, prefix=policy)
        sync(device)
        t0 = time.perf_counter()
        peak = 0
        for r in reqs:
            eng.add_request(r)
        results = []
        while eng.has_unfinished():
            results += eng.step()
            peak = max(peak, eng.num_running)
        sync(device)
        dt = time.perf_counter() - t0
        rows[policy] = {"images_per_s": round(n / dt, 3), "running_peak": peak, "ok": all(r.ok for r in results),
                        "kv_budget": budget}
    rows["pool_bytes"] = pool_bytes
    rows["scalekv_over_full"] = round(rows["scalekv"]["images_per_s"] / rows["full"]["images_per_s"], 3)
    return rows


def check_worker(device: str, quick: bool) -> dict:
    from workers.config import WorkerConfig
    from workers.worker import Worker

    n = 4 if quick else 32
    w = Worker(WorkerConfig(model="var-tiny", device="cuda" if device.startswith("cuda") else "cpu",
                            engine=EngineConfig(max_running=max(n, 1))), metrics=False)
    try:
        spec = w.engine.model.spec
        reqs = [{"key": f"k{i}", "request_id": f"w{i}", "class_label": i % spec.var.num_classes, "seed": i}
                for i in range(n)]
        t0 = time.perf_counter()
        sub = w.submit(reqs)
        got = []
        while len(got) < n and time.perf_counter() - t0 < 300:
            got += w.poll(1.0)["results"]
        dt = time.perf_counter() - t0
        errors = [r.get("error") for r in got if r.get("error")]
        return {"accepted": sub["accepted"], "finished": len(got), "errors": errors[:3],
                "images_per_s": round(len(got) / dt, 3), "ok": len(got) == n and not errors}
    finally:
        w.shutdown()


def write_cpu_tokens() -> None:
    torch.set_num_threads(1)
    model = build_model("var-tiny")
    reqs = make_requests(model, CPU_TOKEN_REQUESTS)
    res = ImageEngine(model, EngineConfig(dtype="float32")).generate(reqs)
    ref = generate_reference(model, reqs, dtype="float32")
    assert tokens_of(res) == tokens_of(ref)
    CPU_TOKENS.write_text(json.dumps({
        "about": "var-tiny shipped weights, CPU float32 engine tokens (== reference), requests of "
                 "benchmarks.gpu_check.make_requests; regenerate with --write-cpu-tokens",
        "requests": [r.model_dump() for r in reqs], "tokens": tokens_of(res)}, separators=(",", ":")) + "\n")
    print(f"wrote {CPU_TOKENS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small batches and shapes (the CPU dry run)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 64 128 (quick: 1 2)")
    ap.add_argument("--models", nargs="+", default=None, help="default var-tiny var-d16 (quick: var-tiny)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip throughput rows past this many seconds")
    ap.add_argument("--only", nargs="+", default=None,
                    help="sections to run: backends tokens syncs busy throughput compression worker")
    ap.add_argument("--write-cpu-tokens", action="store_true", help="(CPU) regenerate the committed CPU tokens")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.write_cpu_tokens:
        write_cpu_tokens()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False "
                         "(use --device cpu --quick for a dry run)")
    batches = args.batches or ([1, 2] if args.quick else [1, 8, 32, 64, 128])
    models = args.models or (["var-tiny"] if args.quick else ["var-tiny", "var-d16"])
    t_start = time.monotonic()
    budget_end = t_start + args.budget_s
    report: dict = {"machine": machine(), "date": today(), "device": args.device, "quick": args.quick,
                    "torch": torch.__version__, "sections": {}}
    sections = {
        "backends": lambda: check_backends(args.device, args.quick),
        "tokens": lambda: check_tokens(args.device, args.quick),
        "syncs": lambda: check_syncs(args.device, args.quick),
        "busy": lambda: check_busy(args.device, args.quick),
        "throughput": lambda: check_throughput(args.device, args.quick, batches, models, budget_end),
        "compression": lambda: check_compression(args.device, args.quick),
        "worker": lambda: check_worker(args.device, args.quick),
    }
    out_dir = os.environ.get("OUT")
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as e:  # record and go on: one broken section must not lose the others
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = res
        print(json.dumps({name: res}, default=str)[:3000], flush=True)
        if out_dir:  # written after every section, so a run cut short still reports
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = round(time.monotonic() - t_start, 1)
    failed = [k for k, v in report["sections"].items() if "error" in v or v.get("ok") is False]
    report["failed_sections"] = failed
    if out_dir:
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"seconds": report["seconds"], "failed_sections": failed}))


if __name__ == "__main__":
    main()
