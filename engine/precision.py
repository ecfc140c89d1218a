"""Compute precision: which dtype to run in, and the autocast context for it.

bf16 is only a speed-up where the hardware runs it natively: CUDA, or a CPU with AVX512
(oneDNN's bf16 kernels; AVX512-BF16/AMX make them several times faster than fp32). On an
AVX2-only CPU, PyTorch falls back to a bf16 matmul that is 20-70x *slower* than fp32,
so the default, ``auto``, picks bf16 only where it pays and float32 everywhere else.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref

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


_CAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def casts_weights_once(dtype: str, device: torch.device | str) -> bool:
    """Inference on CUDA in bf16 runs a bf16 copy of the frozen weights without autocast
    (autocast re-casts every weight on every call: one cast kernel and one temporary per linear
    per layer per step). CPU keeps its autocast / fp32 path unchanged."""
    return torch.device(device).type == "cuda" and resolve_dtype(dtype, device) == "bfloat16"


def inference_module(module: torch.nn.Module, dtype: str, device: torch.device | str) -> torch.nn.Module:
    """The module inference should call: ``module`` itself, or (CUDA + bf16) a bf16 copy of it
    made once and cached for the module's lifetime. The engine and the reference loop both go
    through this, so on CUDA they run the same weights."""
    if not casts_weights_once(dtype, device):
        return module
    cast = _CAST.get(module)
    if cast is None:
        cast = copy.deepcopy(module).to(torch.bfloat16).eval().requires_grad_(False)
        _CAST[module] = cast
    return cast


def inference_context(dtype: str, device: torch.device | str):
    """Autocast for inference, or none where :func:`inference_module` already cast the weights."""
    if casts_weights_once(dtype, device):
        return contextlib.nullcontext()
    return autocast_for(dtype, device)
