"""Matmul throughput in float32 vs bfloat16 on this machine, and what ``dtype=auto`` picks.

    python -m benchmarks.dtype_speed --sizes 256 512 1024 --threads 1

Why it exists: bf16 autocast is a large speed-up on CPUs with native bf16 (AVX512-BF16, AMX)
and a large slow-down on AVX2-only CPUs, where PyTorch runs a scalar fallback. ``auto`` follows
oneDNN's own check; this benchmark shows the ratio behind that choice on the machine at hand.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import best_of, machine, today
from engine.precision import cpu_has_fast_bf16, resolve_dtype


def gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_of(lambda: a @ a, repeats=repeats, warmup=1) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; date: {today()}; CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_fast_bf16()}, "
          f"auto -> {resolve_dtype('auto', 'cpu')}\n")
    print("| n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---|---|---|")
    for n in args.sizes:
        f32, b16 = gflops(n, torch.float32, args.repeats), gflops(n, torch.bfloat16, args.repeats)
        print(f"| {n} | {f32:.1f} | {b16:.2f} | {b16 / f32:.3f} |")


if __name__ == "__main__":
    main()
