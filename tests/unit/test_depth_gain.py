"""The depth plot's arithmetic: gain over the best baseline, paired per seed."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.depth_gain import gains, plot, table


def _row(policy: str, budget: float, per_seed) -> dict:
    return {"policy": policy, "kv_budget": budget, "psnr": float(np.mean(per_seed)), "psnr_per_seed": list(per_seed)}


def _report(model: str, shift: float) -> dict:
    rng = np.random.default_rng(0)
    base = 20 + rng.normal(0, 2, 30)  # per-seed difficulty shared by every policy (the pairing removes it)
    return {"model": model, "results": [
        _row("scalekv", 0.1, base + shift), _row("snapkv", 0.1, base + 0.5), _row("h2o", 0.1, base),
        _row("snapkv-allq", 0.1, base + 9),  # our own variant: not a paper baseline
        _row("snapkv", 0.2, base),  # no scalekv at 0.2: skipped
    ]}


def test_gain_is_paired_against_the_best_paper_baseline(tmp_path):
    deep = gains(_report("var-deep", 2.0))
    tiny = gains(_report("var-tiny", 0.5))
    assert [(g["depth"], g["kv_budget"], g["best_baseline"]) for g in tiny + deep] == [(8, 0.1, "snapkv"),
                                                                                      (32, 0.1, "snapkv")]
    assert deep[0]["gain_db"] == pytest.approx(1.5) and deep[0]["low"] == pytest.approx(1.5)  # no paired noise
    assert tiny[0]["gain_db"] == pytest.approx(0.0, abs=1e-9)
    assert gains(_report("var-deep", 2.0), against=("snapkv-allq",))[0]["gain_db"] == pytest.approx(-7.0)
    out = tmp_path / "depth.png"
    plot(tiny + deep, out)
    assert out.stat().st_size > 1000
    assert "| var-deep | 32 | 0.1 |" in table(tiny + deep)
