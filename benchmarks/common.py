"""Helpers shared by the benchmark scripts: machine description and timing."""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable

import torch

from engine.precision import cpu_has_fast_bf16


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    # which dtype `auto` picks depends on it: the same command measures bf16 on one box, fp32 on another
    bf16 = ("native bf16 (CPU dtype auto = bfloat16)" if cpu_has_fast_bf16()
            else "no native bf16 (CPU dtype auto = float32)")
    return (f"{cpu}, {os.cpu_count()} CPUs, {bf16}, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads{gpu}")


def today() -> str:
    return datetime.date.today().isoformat()


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` runs after ``warmup`` runs (least disturbed by a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
