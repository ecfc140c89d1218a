"""Compute dtype selection: ``auto`` picks bf16 only where the hardware runs it natively."""

from __future__ import annotations

import pytest
import torch

import engine.precision as precision
from engine.api import EngineConfig, ImageEngine


@pytest.mark.parametrize(("fast", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_cpu_and_explicit_dtypes_are_kept(monkeypatch, fast, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert precision.resolve_dtype("auto", "cpu") == expected
    assert precision.resolve_dtype("float32", "cpu") == "float32"
    assert precision.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    a = torch.randn(4, 4)
    with precision.autocast_for("auto", "cpu"):
        assert (a @ a).dtype == getattr(torch, expected)


def test_auto_is_bf16_on_cuda_devices(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_dtype("auto", "cuda") == "bfloat16"


def test_unknown_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="dtype"):
        precision.resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="fp8")


@pytest.mark.parametrize(("fast", "kv_dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_engine_resolves_auto_for_its_device(monkeypatch, micro_model, fast, kv_dtype):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    engine = ImageEngine(micro_model, EngineConfig(dtype="auto", block_size=4, kv_pool_bytes=1 << 20))
    assert engine.pool.dtype == kv_dtype
    assert engine.runner.dtype == engine.dtype == str(kv_dtype).removeprefix("torch.")
