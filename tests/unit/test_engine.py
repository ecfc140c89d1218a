"""Paged engine: exact equality with the reference loop, admission under a small pool, pages returned."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.api import EngineConfig, ImageEngine
from engine.reference import generate_reference
from engine.request import ImageRequest


def _reqs(n: int, seed0: int = 40) -> list[ImageRequest]:
    return [
        ImageRequest(class_label=(3 * i) % 10, seed=seed0 + i, cfg=1.0 + 0.5 * (i % 3), top_k=8 + i, top_p=0.9,
                          request_id=f"q{i}")
        for i in range(n)
    ]


def _engine(model, **kw) -> ImageEngine:
    return ImageEngine(model, EngineConfig(**{"dtype": "float32", "block_size": 4, **kw}))


def test_engine_matches_reference_with_staggered_arrivals_and_a_small_pool(micro_model):
    reqs = _reqs(7)
    ref = {r.request_id: r.tokens for r in generate_reference(micro_model, reqs)}
    eng = _engine(micro_model)
    per_request = eng.manager.request_pages(eng.plan_for("full", 1.0))
    # A pool for 2.5 requests: the rest must wait for pages.
    eng = _engine(micro_model, kv_pool_bytes=int(2.5 * per_request * eng.pool.page_bytes))
    out, waited, mixed_steps = [], False, False
    pending = list(reqs)
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % 2 == 0:  # a new arrival every other step
            eng.add_request(pending.pop(0))
            eng.add_request(pending.pop(0)) if pending and step == 4 else None
        waited |= eng.num_waiting > 0
        mixed_steps |= len({st.scale for st in eng.running}) > 1
        assert eng.pool.num_used <= eng.pool.num_pages
        out += eng.step()
        step += 1
    assert waited and mixed_steps
    got = {r.request_id: r.tokens for r in out}
    assert all(r.ok for r in out)
    assert got == ref
    assert eng.pool.num_free == eng.pool.num_pages
    assert eng.manager.available_pages() == eng.pool.num_pages


def test_max_batch_tokens_and_max_running_are_respected(micro_model):
    eng = _engine(micro_model, max_batch_tokens=40, max_running=3)
    for r in _reqs(5):
        eng.add_request(r)
    results = []
    while eng.has_unfinished():
        assert eng.num_running <= 3
        results += eng.step()
    assert len(results) == 5 and all(r.ok for r in results)
    assert eng.pool.num_free == eng.pool.num_pages


def test_request_larger_than_the_pool_is_rejected_not_queued(micro_model):
    eng = _engine(micro_model, kv_pool_bytes=4 * 4 * 32 * 2 * 4 * 5)  # 5 pages
    assert eng.add_request(_reqs(1)[0]) is False
    (res,) = eng.step()
    assert not res.ok and "whole pool" in res.error and "kv_pool_bytes" in res.error
    assert not eng.has_unfinished()


def test_malformed_request_is_refused_at_construction_naming_every_field():
    with pytest.raises(ValidationError) as e:
        ImageRequest(class_label=1, cfg=float("nan"), top_p=2.0, request_id="bad-cfg")
    assert {err["loc"][0] for err in e.value.errors()} == {"cfg", "top_p"}


def test_bad_requests_get_errors_and_others_carry_on(micro_model):
    eng = _engine(micro_model)
    bad = [ImageRequest(class_label=99, request_id="bad-class"),
           ImageRequest(class_label="ring-striped", request_id="bad-name"),  # var-micro has no class names
           ImageRequest(class_label=1, policy="nope", request_id="bad-policy")]
    good = _reqs(2)
    results = eng.generate(bad + good)
    errors = {r.request_id: r for r in results if not r.ok}
    assert set(errors) == {"bad-class", "bad-name", "bad-policy"}
    assert errors["bad-class"].fields == ("class_label",) and "0..9" in errors["bad-class"].error
    assert errors["bad-name"].fields == ("class_label",) and "index" in errors["bad-name"].error
    assert errors["bad-policy"].fields == ("policy",)
    assert [r.ok for r in results[3:]] == [True, True]
    assert eng.pool.num_free == eng.pool.num_pages


def test_pages_come_back_when_a_step_raises(micro_model, monkeypatch):
    eng = _engine(micro_model)
    for r in _reqs(3):
        eng.add_request(r)
    eng.step()
    eng.step()
    assert eng.pool.num_used > 0
    calls = {"n": 0}
    real = eng.runner._attend  # runs on every layer, whichever attention path the layer takes

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer of this step
            raise RuntimeError("injected failure mid-step")
        return real(*a, **kw)

    monkeypatch.setattr(eng.runner, "_attend", flaky)
    failed = eng.step()
    assert len(failed) == 3 and all("injected failure" in r.error for r in failed)
    assert eng.pool.num_free == eng.pool.num_pages
    monkeypatch.setattr(eng.runner, "_attend", real)
    ok = eng.generate(_reqs(2, seed0=7))  # the engine keeps serving
    assert all(r.ok for r in ok) and eng.pool.num_free == eng.pool.num_pages


def test_engine_config_validates_fields():
    with pytest.raises(ValueError, match="kv_budget"):
        EngineConfig(kv_budget=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EngineConfig(max_batch_tokens=0)


def test_engine_config_from_environment_and_flags(monkeypatch):
    import argparse

    monkeypatch.setenv("SCALEKV_KV_POOL_BYTES", "64MiB")
    monkeypatch.setenv("SCALEKV_MAX_RUNNING", "5")
    monkeypatch.setenv("SCALEKV_KV_BUDGET", "0.25")
    cfg = EngineConfig.from_args(argparse.Namespace(max_running=7))
    assert cfg.kv_pool_bytes == 64 << 20 and cfg.kv_budget == 0.25
    assert cfg.max_running == 7  # the flag wins over the environment
    monkeypatch.setenv("SCALEKV_BLOCK_SIZE", "sixteen")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_args(argparse.Namespace())


def test_duplicate_request_ids_are_served_independently(micro_model):
    eng = _engine(micro_model)
    a, b = _reqs(2)
    b = b.model_copy(update={"request_id": a.request_id})
    results = eng.generate([a, b])
    assert [r.ok for r in results] == [True, True]
    assert results[0].tokens != results[1].tokens  # different seeds, both really generated
    assert eng.pool.num_free == eng.pool.num_pages


def test_kv_peak_is_the_true_per_step_peak_not_pool_peak_plus_last_scratch(micro_model):
    """The peak a result reports is the most KV that exists at once: a step's pages plus that
    step's scratch (one layer's current K/V, both CFG sequences). For ``full`` the pages held
    during scale si are the plan's ``pages_at(si)``; the pool's overall peak and the last
    scale's scratch never coincide, so their sum would over-count."""
    eng = _engine(micro_model)
    (res,) = eng.generate(_reqs(1))
    var = micro_model.spec.var
    plan = eng.plan_for("full", 1.0)
    page, elem = eng.pool.page_bytes, eng.pool.kv.element_size()
    scratch = [2 * n * 2 * var.width * elem for n in var.scale_lengths()]
    per_step = [2 * sum(plan.pages_at(si, eng.pool.block_size)) * page + scratch[si] for si in range(var.num_scales)]
    assert res.kv_peak_bytes == max(per_step)
    pool_peak = res.stats["pages_peak"] * page
    assert pool_peak < res.kv_peak_bytes <= pool_peak + scratch[-1]
