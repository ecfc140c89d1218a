"""Compressing KV policies on Infinity (infinity-micro, random init): the paged engine's tokens
equal a dense reference compressed by the same policy over h x w maps, for a batch mixing two
aspect ratios; every page returns; the scheduler's page demand is the engine's reservation;
calibration on prompts gives a profile with which scalekv runs through the engine."""

from __future__ import annotations

import zlib

import pytest
import torch

from engine.calibrate import calibrate, calibrate_infinity
from engine.config import EngineConfig
from engine.infinity_engine import InfinityEngine
from engine.infinity_reference import TextImageRequest, run_infinity_scales
from engine.infinity_runner import pack_bits
from engine.models.registry import build_model
from engine.request import ImageRequest
from memory.budgets import compressed_scales
from memory.policies import SelectionContext, make_policy
from memory.profile import ScaleProfile
from scheduler.demand import DemandCalculator
from tests.conftest import perturb_
from tests.dense_compressed import DenseCompressedCache

RATIOS = (1.0, 2.0)  # grids 4x4 and 6x3 at the last scale


class FakeEncoder:
    """Deterministic random encoder states per prompt (the right width, no T5)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append(torch.randn(3 + len(p) % 4, self.channels, generator=g))
        return out


@pytest.fixture(scope="module")
def loaded():
    m = build_model("infinity-micro", random_init=True, seed=0)
    perturb_(m.model, 0.05, seed=1)
    return m


def _engine(loaded, **kw) -> InfinityEngine:
    base = {"dtype": "float32", "block_size": 4, "window_size": 4, "kv_pool_bytes": 4 << 20}
    return InfinityEngine(loaded, EngineConfig(**{**base, **kw}), text_encoder=FakeEncoder(
        loaded.spec.model.text_channels))


PROMPTS = ["a red ring", "a blue dog", "a cat", "big sea"]


def _requests(ratios=RATIOS) -> list[ImageRequest]:
    return [ImageRequest(request_id=f"r{i}", prompt=p, seed=3 + i, h_div_w=ratios[i % len(ratios)])
            for i, p in enumerate(PROMPTS)]


def _dense_tokens(loaded, eng: InfinityEngine, reqs: list[ImageRequest], policy: str, budget: float) -> dict:
    enc, cfg = eng.text_encoder(), loaded.spec.model
    out = {}
    for ratio in sorted({cfg.nearest_ratio(r.height_over_width) for r in reqs}):
        group = [r for r in reqs if cfg.nearest_ratio(r.height_over_width) == ratio]
        trs = [TextImageRequest(text=enc.encode([r.prompt])[0], seed=r.seed, h_div_w=ratio,
                                request_id=r.request_id).resolved(loaded) for r in group]
        plan = eng.plan_for(policy, budget, ratio)
        kernel = getattr(eng.policy_for(policy), "pool_kernel", None)
        cache = DenseCompressedCache(loaded.softmax_scales, plan, make_policy(policy, 4, kernel), cfg.schedule(ratio))
        toks, _f, _c = run_infinity_scales(loaded, trs, cache=cache)
        for j, r in enumerate(group):
            out[r.request_id] = torch.cat([pack_bits(t[j]) for t in toks]).tolist()
    return out


def _assert_empty(eng):
    s = eng.stats()
    assert s["used"] == 0 and s["requests_reserved"] == 0 and s["available_pages"] == s["num_pages"], s


@pytest.mark.parametrize("budget", [0.5, 0.3])
@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "h2o", "sliding", "streaming"])
def test_compressed_infinity_engine_equals_the_dense_compressed_reference(loaded, policy, budget):
    eng = _engine(loaded, policy=policy, kv_budget=budget)
    for ratio in RATIOS:
        assert compressed_scales(loaded.spec.model.schedule(ratio), budget)  # something is evicted
    reqs = _requests()
    res = eng.generate(reqs)
    assert all(r.ok for r in res), [r.error for r in res]
    got = {r.request_id: r.tokens for r in res}
    assert got == _dense_tokens(loaded, eng, reqs, policy, budget)
    _assert_empty(eng)
    if policy == "h2o":
        assert eng.policy_for("h2o").num_tracked == 0


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "h2o"])
def test_scheduler_demand_is_the_engines_reservation(loaded, policy):
    eng = _engine(loaded, policy=policy, kv_budget=0.3)
    calc = DemandCalculator("infinity-micro", eng.config)
    for ratio in RATIOS:
        want = eng.manager.request_pages(eng.plan_for(policy, 0.3, ratio))
        got = calc.demand(policy, 0.3, eng.pool.block_size, eng.pool.num_pages, h_div_w=ratio)
        assert got["pages"] == want, (ratio, got)
        assert want < eng.manager.request_pages(eng.plan_for("full", 1.0, ratio))


def test_scalekv_needs_a_profile_of_the_schedule(loaded, tmp_path):
    eng = _engine(loaded, policy="scalekv", kv_budget=0.5)
    (r,) = eng.generate(_requests((1.0,))[:1])
    assert not r.ok and r.fields == ("policy",) and "profile_path" in r.error
    calc = DemandCalculator("infinity-micro", eng.config)
    assert calc.demand("scalekv", 0.5, 4, 10**6)["field"] == "policy"


@pytest.mark.parametrize("ratio", RATIOS)
def test_calibration_on_prompts_and_scalekv_through_the_engine(loaded, tmp_path, ratio):
    cfg = loaded.spec.model
    g = torch.Generator().manual_seed(0)
    texts = [torch.randn(5, cfg.text_channels, generator=g) for _ in range(3)]
    prof = calibrate_infinity(loaded, texts, h_div_w=ratio, num_queries=8)
    assert prof.patch_nums == tuple(cfg.schedule(ratio)) and prof.depth == cfg.depth
    assert sum(len(d) for d in prof.drafters) == len(prof.patch_nums) - 1
    assert calibrate(loaded, texts=texts, h_div_w=ratio, num_queries=8) == prof  # deterministic, same entry
    path = tmp_path / "inf_profile.json"
    prof.save(path)
    assert ScaleProfile.load(path) == prof  # (h, w) schedules round-trip
    for policy in ("scalekv", "scalekv-allq"):
        for budget in (0.5, 0.3):
            eng = _engine(loaded, policy=policy, kv_budget=budget, profile_path=str(path))
            reqs = _requests((ratio,))
            res = eng.generate(reqs)
            assert all(r.ok for r in res), [r.error for r in res]
            assert {r.request_id: r.tokens for r in res} == _dense_tokens(loaded, eng, reqs, policy, budget)
            _assert_empty(eng)
    # another aspect ratio has another schedule: refused, naming profile_path
    other = RATIOS[1 - RATIOS.index(ratio)]
    eng = _engine(loaded, policy="scalekv", kv_budget=0.5, profile_path=str(path))
    (r,) = eng.generate(_requests((other,))[:1])
    assert not r.ok and "profile_path" in r.error and "schedule" in r.error
    calc = DemandCalculator("infinity-micro", eng.config)
    assert calc.demand("scalekv", 0.5, 4, 10**6, h_div_w=ratio)["pages"] == \
        eng.manager.request_pages(eng.plan_for("scalekv", 0.5, ratio))
    assert calc.demand("scalekv", 0.5, 4, 10**6, h_div_w=other)["field"] == "policy"


def test_windows_on_h_by_w_maps():
    from memory.policies import grid_window, last_window

    # a 2 x 2 grid over a 4 x 2 map: rows [0, 2) and [2, 4) -> centres 0, 2; columns 0, 1
    assert grid_window(4, 4, 2).tolist() == [0, 1, 4, 5]
    # 6 x 3 map, 2 x 2 grid: row cells [0, 3), [3, 6) -> 1, 4; column cells [0, 1), [1, 3) -> 0, 1
    assert grid_window(6, 4, 3).tolist() == [3, 4, 12, 13]
    assert grid_window(5, 4).tolist() == grid_window(5, 4, 5).tolist() == [0, 3, 15, 18]
    assert last_window(6, 4, 3).tolist() == [14, 15, 16, 17]
    ctx = SelectionContext(layer=0, scale=1, height=6, width=3, hist_len=2, capacity=3, softmax_scale=1.0)
    assert ctx.side is None and ctx.shape == (6, 3) and ctx.num_candidates == 20
    sq = SelectionContext(layer=0, scale=1, side=4, hist_len=2, capacity=3, softmax_scale=1.0)
    assert (sq.height, sq.width, sq.side) == (4, 4, 4)
    with pytest.raises(ValueError, match="disagrees"):
        SelectionContext(layer=0, scale=1, side=4, height=6, width=3)


def test_calibrate_cli_on_infinity_with_prompts(tmp_path, capsys):
    """``scalekv calibrate`` works on Infinity models: prompts through the local encoder, one
    schedule, a profile that scalekv then serves that schedule with."""
    import json

    from engine.models.catalog import get_infinity_spec
    from memory.profile import ScaleProfile
    from scalekv.cli import main
    from tests.tiny_t5 import write_tiny_t5

    spec = get_infinity_spec("infinity-micro")
    enc = write_tiny_t5(tmp_path / "t5", d_model=spec.model.text_channels)
    out = tmp_path / "prof.json"
    assert main(["calibrate", "--model", "infinity-micro", "--random-init", "--prompt", "a red ring", "--prompt",
                 "a blue cross", "--text-encoder", str(enc), "--aspect-ratio", "1:2", "--num-queries", "8",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    prof = ScaleProfile.load(out)
    assert summary["model"] == "infinity-micro" and prof.model == "infinity-micro"
    assert any(tuple(p) != (p[0], p[0]) for p in prof.patch_nums if not isinstance(p, int))  # a 2:1 schedule
    assert main(["calibrate", "--model", "infinity-micro", "--random-init", "--out", str(out)]) == 2
    assert "--prompt" in capsys.readouterr().err
