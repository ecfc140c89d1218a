"""Compression in the paged engine: exactness at budget 1, equality with a dense compressed
reference, pages returned to the pool, mixed policies in one batch, stats, fidelity harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.api import EngineConfig, ImageEngine
from engine.reference import run_scales
from engine.request import ImageRequest
from memory.budgets import compressed_scales
from memory.policies import POLICIES, make_policy
from memory.profile import ScaleProfile
from tests.dense_compressed import DenseCompressedCache

COMPRESSING = [p for p in POLICIES if p != "full"]


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory, micro_model):
    """A hand-made var-micro profile (a drafter at every scale), independent of calibration."""
    cfg = micro_model.spec.var
    prof = ScaleProfile(model="var-micro", patch_nums=tuple(cfg.patch_nums), depth=cfg.depth,
                        drafters=((), (0,), (1,), (0,)))
    path = tmp_path_factory.mktemp("profile") / "scale_profile.json"
    prof.save(path)
    return str(path)


def _reqs(n: int, seed0: int = 11, **kw) -> list[ImageRequest]:
    return [ImageRequest(class_label=(2 * i + 1) % 10, seed=seed0 + i, cfg=1.5, top_k=10, top_p=0.9,
                              request_id=f"c{i}", **kw) for i in range(n)]


def _engine(model, profile_path, **kw) -> ImageEngine:
    base = {"dtype": "float32", "block_size": 4, "window_size": 4, "kv_pool_bytes": 4 << 20,
            "profile_path": profile_path}
    return ImageEngine(model, EngineConfig(**{**base, **kw}))


def _tokens(results) -> dict[str, list[int]]:
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return {r.request_id: r.tokens for r in results}


def _dense_generate(model, requests, plan, policy) -> dict[str, list[int]]:
    cache = DenseCompressedCache([blk.attn.softmax_scale for blk in model.var.blocks], plan, policy,
                                 [(p, p) for p in model.spec.var.patch_nums])
    toks, _f_hat, _cache = run_scales(model, requests, cache=cache)
    flat = torch.cat(toks, dim=1)
    return {r.request_id: flat[i].tolist() for i, r in enumerate(requests)}


def test_budget_one_reproduces_full_tokens_for_every_policy(micro_model, profile_path):
    reqs = _reqs(3)
    full = _tokens(_engine(micro_model, profile_path).generate(reqs))
    for policy in COMPRESSING:
        eng = _engine(micro_model, profile_path, policy=policy, kv_budget=1.0)
        assert _tokens(eng.generate(reqs)) == full, policy
        assert eng.pool.num_free == eng.pool.num_pages


@pytest.mark.parametrize("policy", COMPRESSING)
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_compressed_engine_equals_the_dense_compressed_reference(micro_model, profile_path, policy, budget):
    reqs = _reqs(3)
    eng = _engine(micro_model, profile_path, policy=policy, kv_budget=budget)
    plan = eng.plan_for(policy, budget)
    assert compressed_scales(micro_model.spec.var.patch_nums, budget)  # something is evicted
    got = _tokens(eng.generate(reqs))
    kernel = getattr(eng.policy_for(policy), "pool_kernel", None)  # the engine passes its pool_kernel
    want = _dense_generate(micro_model, [r.resolved(1.5, 10, 0.9) for r in reqs], plan,
                           make_policy(policy, 4, kernel))
    assert got == want
    assert eng.pool.num_free == eng.pool.num_pages and eng.manager.available_pages() == eng.pool.num_pages


def test_pages_freed_by_compression_return_to_the_pool(micro_model, profile_path, monkeypatch):
    eng = _engine(micro_model, profile_path, policy="scalekv", kv_budget=0.5)
    plan = eng.plan_for("scalekv", 0.5)
    comp = set(compressed_scales(micro_model.spec.var.patch_nums, 0.5))
    drops, real = [], eng.manager.set_tokens

    def recording(seq, layer, n):
        before = eng.pool.num_used
        real(seq, layer, n)
        drops.append((eng.runner._groups[0].scale, before - eng.pool.num_used))

    monkeypatch.setattr(eng.manager, "set_tokens", recording)
    for r in _reqs(2):
        eng.add_request(r)
    saw_drafter_pages = False
    while eng.has_unfinished():
        eng.step()
        for st in eng.running:  # after every step the pool holds exactly the plan's pages
            want = sum(-(-plan.kept[st.scale - 1][la] // 4) for la in range(plan.num_layers))
            assert sum(eng.manager.table.num_pages(s) for s in st.seqs) == 2 * want
        stats = eng.stats()
        saw_drafter_pages |= stats["drafter_pages"] > 0
        assert stats["drafter_pages"] + stats["refiner_pages"] == stats["held_pages"]
    assert any(scale in comp and freed > 0 for scale, freed in drops)  # freed mid-scale, not at the end
    assert saw_drafter_pages
    assert eng.pool.num_free == eng.pool.num_pages and eng.manager.available_pages() == eng.pool.num_pages


def test_mixed_policies_in_one_batch_match_solo_runs(micro_model, profile_path):
    mixed = [ImageRequest(class_label=i % 10, seed=5 + i, request_id=f"m{i}", policy=p, kv_budget=b)
             for i, (p, b) in enumerate([("scalekv", 0.5), ("h2o", 0.2), ("full", None), ("snapkv", 0.2),
                                         ("scalekv", 0.2), ("pyramidkv", 0.5), ("h2o", 0.5)])]
    eng = _engine(micro_model, profile_path)
    together = _tokens(eng.generate(mixed))
    for r in mixed:
        assert _tokens(_engine(micro_model, profile_path).generate([r])) == {r.request_id: together[r.request_id]}
    assert eng.policy_for("h2o").num_tracked == 0  # policy state released with the requests
    assert eng.pool.num_free == eng.pool.num_pages


def test_scalekv_needs_a_matching_profile(micro_model, tmp_path):
    eng = ImageEngine(micro_model, EngineConfig(dtype="float32", policy="scalekv", kv_budget=0.5,
                                                kv_pool_bytes=1 << 20))
    (res,) = eng.generate(_reqs(1))
    assert not res.ok and "scale profile" in res.error and "scalekv calibrate --model var-micro" in res.error
    other = ScaleProfile(model="var-tiny", patch_nums=(1, 2, 4, 8), depth=2, drafters=((), (), (), ()))
    other.save(tmp_path / "tiny.json")
    eng = _engine(micro_model, str(tmp_path / "tiny.json"), policy="scalekv", kv_budget=0.5)
    (res,) = eng.generate(_reqs(1))
    assert not res.ok and "model is 'var-tiny'" in res.error
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="lru")
    with pytest.raises(ValueError, match="window_size"):
        EngineConfig(window_size=10)


def test_fidelity_metrics():
    from benchmarks.fidelity import PSNR_CAP, psnr, ssim, token_agreement

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == pytest.approx(1.0)
    assert 20 < psnr(a, b) < 40 and 0 < ssim(a, b) < 1
    assert ssim(a, 255 - a) < 0.1
    assert token_agreement([1, 2, 3, 4, 5], [1, 2, 0, 4, 0], [1, 4]) == [1.0, 0.5]


def test_fidelity_cli_end_to_end(micro_model, profile_path, tmp_path, capsys):
    from scalekv.cli import main

    out = tmp_path / "fid.json"
    rc = main(["bench", "fidelity", "--model", "var-micro", "--random-init", "--policies", "full,scalekv,sliding",
               "--budgets", "0.2,0.5", "--num", "2", "--block-size", "4", "--window-size", "4",
               "--profile-path", profile_path, "--kv-pool-bytes", "1MiB", "--report", str(out), "--plot",
               str(tmp_path / "plots")])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["full"]["psnr"] == rep["psnr_cap"] and rep["full"]["kv_ratio"] == 1.0
    assert {(r["policy"], r["kv_budget"]) for r in rep["results"]} == {(p, b) for p in ("scalekv", "sliding")
                                                                      for b in (0.2, 0.5)}
    for r in rep["results"]:
        assert set(r) >= {"psnr", "ssim", "token_agreement", "kv_peak_bytes", "kv_ratio", "capacity",
                          "capacity_ratio", "kv_pool_ratio"}
        assert len(r["token_agreement"]) == 4 and r["token_agreement"][0] == 1.0
        assert r["kv_pool_ratio"] < 1 and r["capacity_ratio"] > 1
    assert (tmp_path / "plots" / "budget_sweep.png").exists()
    assert (tmp_path / "plots" / "grid_budget_0.2.png").exists()
    assert "scalekv" in capsys.readouterr().out


def test_peak_limit_holds_in_the_pool_measured_peak(micro_model, profile_path):
    """``peak_limit`` bounds what the pool really holds: the result's measured KV peak (pages
    held at once + scratch) equals the plan's prediction and stays within the limit of full's
    measured peak, below the unlimited plan's."""
    from memory.budgets import step_peak

    (full,) = _engine(micro_model, profile_path).generate(_reqs(1))
    (free,) = _engine(micro_model, profile_path, policy="scalekv", kv_budget=0.7).generate(_reqs(1))
    limit = 0.97 * free.kv_peak_bytes / full.kv_peak_bytes
    eng = _engine(micro_model, profile_path, policy="scalekv", kv_budget=0.7, peak_limit=limit)
    (res,) = eng.generate(_reqs(1))
    assert res.ok, res.error
    plan, var = eng.plan_for("scalekv", 0.7), micro_model.spec.var
    page, token = eng.pool.page_bytes, eng.pool.page_bytes // eng.pool.block_size
    predicted = max(2 * step_peak([plan.history(si, la) for la in range(var.depth)], plan.kept[si],
                                  eng.pool.block_size)[0] * page + 2 * n * token
                    for si, n in enumerate(var.scale_lengths()))
    assert res.kv_peak_bytes == predicted
    assert res.kv_peak_bytes <= limit * full.kv_peak_bytes < free.kv_peak_bytes
