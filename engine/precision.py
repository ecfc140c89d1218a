"""Compute precision: which dtype to run in, and the autocast context for it.

bf16 is only a speed-up where the hardware runs it natively: CUDA, or a CPU with AVX512
(oneDNN's bf16 kernels; AVX512-BF16/AMX make them several times faster than fp32). On an
AVX2-only CPU, PyTorch falls back to a bf16 matmul that is 20-70x *slower* than fp32,
so the default, ``auto``, picks bf16 only where it pays and float32 everywhere else.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .config import DTYPES  # noqa: F401  (re-exported)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512 and newer)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: be safe
        return False


def resolve_dtype(dtype: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bfloat16`` on CUDA or a CPU with fast bf16, else ``float32``; other
    values are checked and returned as they are."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    kind = torch.device(device).type
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and cpu_has_fast_bf16()) else "float32"


def autocast_for(dtype: str, device: torch.device | str):
    """Autocast context for a dtype name (``auto`` resolved for ``device``)."""
    kind = torch.device(device).type
    if resolve_dtype(dtype, device) == "bfloat16":
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)
    if kind in ("cpu", "cuda"):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()
