"""Shared fixtures: tiny random models with non-trivial weights, and one-thread torch."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; one thread avoids oversubscription with Ray workers


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: VAR's init makes blocks start near identity (gammas 1e-3),
    which would let equivalence tests pass even if attention were wrong."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture(scope="session")
def micro_model():
    from engine.models.registry import build_model

    m = build_model("var-micro", random_init=True, seed=0)
    perturb_(m.var, 0.05, seed=1)
    return m
