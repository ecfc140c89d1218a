"""Cluster pieces without Ray: routing by free pages, and the Worker class driven in-process."""

from __future__ import annotations

import time

import pytest

from engine.api import EngineConfig, ImageEngine
from engine.models.registry import build_model
from engine.request import FieldError, ImageRequest, ImageResult, RecordError
from scheduler.demand import DemandCalculator
from scheduler.jobs import Item, JobTable
from scheduler.routing import WorkerView, pick_worker, route
from scheduler.store import JobStore
from workers.config import WorkerConfig
from workers.worker import Worker

ENGINE = EngineConfig(dtype="float32", block_size=4, kv_pool_bytes=2 << 20)


def test_pick_worker_prefers_most_free_pages_and_respects_limits():
    a, b = WorkerView("a", 100, reserved_pages=30), WorkerView("b", 100, reserved_pages=10)
    assert pick_worker([a, b], 20).name == "b"
    assert pick_worker([a, b], 95) is None
    b.in_flight, b.max_inflight = 4, 4
    assert pick_worker([a, b], 20).name == "a"
    ties = [WorkerView("y", 50, in_flight=2), WorkerView("x", 50, in_flight=2), WorkerView("z", 50, in_flight=1)]
    assert pick_worker(ties, 1).name == "z"


def test_route_spreads_load_and_stops_at_the_first_request_that_fits_nowhere():
    views = [WorkerView("a", 10), WorkerView("b", 10)]
    assigned = route([4, 4, 4, 4, 4, 1], views, lambda d: d)  # the fifth 4 fits nowhere: the 1 waits too
    assert [(d, w.name) for d, w in assigned] == [(4, "a"), (4, "b"), (4, "a"), (4, "b")]
    assert [v.reserved_pages for v in views] == [8, 8]


def test_job_table_returns_each_result_once_and_keeps_no_finished_job_in_memory(tmp_path):
    table = JobTable(JobStore(tmp_path))
    reqs = [("a", 0, ImageRequest(request_id="a", class_label=1, seed=2, job_id="j1").model_dump_json(), 8)]
    job = table.create("j1", "test", 3, reqs, [RecordError("c", 2, (FieldError("cfg", "must be finite"),))])
    with pytest.raises(ValueError, match="job_id"):
        table.create("j1", "again", 1, [])
    item = Item("j1", ImageRequest(request_id="a", class_label=1, seed=2, job_id="j1"), demand=8, t_submitted=0.0,
                t_queued=0.0)
    ok = ImageResult("a", 1, 2, job_id="j1", tokens=[1], stats={"worker": "w0"}).to_record(png=b"x")
    assert table.add_result("j1", "a", ok, item)
    assert not table.add_result("j1", "a", dict(ok, stats={"worker": "w1"}), item)  # second run
    assert job.done == {"a", "c"} and not job.finished
    assert table.add_result("j1", "b", None, None, error="class_label: unknown class 99")
    assert "j1" not in table.jobs  # finished: everything is in the store
    first = table.take("j1", 0, max_results=2)
    assert [r["request_id"] for r in first["results"]] == ["c", "a"] and not first["done"]
    assert first["results"][1]["stats"]["worker"] == "w0" and first["results"][1]["png"] == b"x"
    assert first["results"][0]["fields"] == ["cfg"]
    assert set(first["results"][0]) == set(first["results"][1])  # one schema for images and errors
    last = table.take("j1", first["cursor"], max_results=10)
    assert [r["fields"] for r in last["results"]] == [["class_label"]] and last["done"]
    again = table.take("j1", 0, max_results=10)  # a cursor read is idempotent: `scalekv wait` twice
    assert [r["request_id"] for r in again["results"]] == ["c", "a", "b"]
    assert not table.add_result("j1", "a", {}, None)  # a late run of a finished job's request
    assert table.counters == {"results": 3, "errors": 2, "duplicates_dropped": 2}


def test_store_survives_a_reopen_and_evicts_collected_results(tmp_path):
    store = JobStore(tmp_path)
    table = JobTable(store)
    body = ImageRequest(request_id="x", class_label=1, job_id="j").model_dump_json()
    table.create("j", "n", 2, [("x", 0, body, 4), ("y", 1, body, 4)])
    table.add_result("j", "x", ImageResult("x", 1, 0, job_id="j").to_record(png=b"png"), None)
    store.close()
    again = JobTable(JobStore(tmp_path))  # a restarted scheduler
    assert [(p[1], p[4]) for p in again.restore()] == [("y", 4)]
    assert again.jobs["j"].done == {"x"}
    assert not again.add_result("j", "x", ImageResult("x", 1, 0).to_record(), None)  # deduplicated after restart
    assert again.add_result("j", "y", ImageResult("y", 1, 0, job_id="j").to_record(png=b"png2"), None)
    assert list((tmp_path / "results" / "j").iterdir())  # PNGs on disk, not in memory
    assert again.take("j", None, 10)["done"] and again.store.job("j")["collected_at"] is not None
    assert again.store.evict(collected_retention_s=0, retention_s=1e9) == ["j"]
    assert not (tmp_path / "results" / "j").exists() and again.store.counts()["results_stored"] == 0
    with pytest.raises(LookupError, match="evicted"):
        again.take("j", 0, 10)
    assert again.store.job("j")["finished"] == 2  # counts kept


def _wire(i: int) -> ImageRequest:
    return ImageRequest(request_id=f"q{i}", class_label=i % 10, seed=100 + i, cfg=1.5, top_k=6, top_p=0.9,
                        job_id="job")


def _drain(worker: Worker, n: int, timeout: float = 60) -> list[dict]:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += worker.poll(0.5)["results"]
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker(WorkerConfig(model="var-micro", random_init=True, seed=0, engine=ENGINE, threads=1), "w0",
               metrics=False)
    yield w
    w.shutdown()


def test_worker_results_match_the_single_process_engine(worker):
    results = {}
    assert worker.submit([_wire(i) for i in range(4)], worker.incarnation)["accepted"] == 4
    assert worker.submit([_wire(i) for i in range(4, 6)])["accepted"] == 2
    for r in _drain(worker, 6):
        results[r["key"]] = r
    engine = ImageEngine(build_model("var-micro", random_init=True, seed=0), ENGINE)
    ref = engine.generate([ImageRequest(class_label=i % 10, seed=100 + i, cfg=1.5, top_k=6, top_p=0.9,
                                        request_id=f"q{i}", job_id="job") for i in range(6)])
    assert sorted(results) == sorted(f"job/{r.request_id}" for r in ref)
    for r in ref:
        got = results[f"job/{r.request_id}"]
        assert got["ok"] and got["tokens"] == r.tokens and got["png"] == r.png_bytes()
        assert got["stats"]["worker"] == "w0" and got["stats"]["incarnation"] == worker.incarnation
        assert got["job_id"] == "job" and got["request_id"] == r.request_id
    st = worker.stats()
    assert st["engine"]["used"] == 0 and st["engine"]["available_pages"] == st["engine"]["num_pages"]
    assert st["held"] == 0 and st["finished_total"] >= 6 and st["latency"]["count"] >= 6 and st["rss_bytes"] > 0


def test_worker_refuses_stale_incarnations_and_duplicate_keys(worker):
    stale = worker.submit([_wire(20)], "not-this-one")
    assert stale["stale"] and stale["accepted"] == 0
    worker.pause()
    try:
        first = worker.submit([_wire(21), _wire(22)], worker.incarnation)
        again = worker.submit([_wire(22)], worker.incarnation)
        assert first["accepted"] == 2 and again["duplicates"] == ["job/q22"] and again["accepted"] == 0
        time.sleep(0.3)
        assert worker.poll(0.1)["results"] == []  # paused: accepted requests wait in the engine, nothing steps
        assert worker.stats()["engine"]["num_requests_waiting"] == 2
    finally:
        worker.resume()
    assert sorted(r["key"] for r in _drain(worker, 2)) == ["job/q21", "job/q22"]
    assert worker.stats()["engine"]["used"] == 0


def test_worker_page_demand_uses_the_engine_plan_and_names_bad_policies(worker):
    d = worker.page_demand(None, None)
    engine = worker.engine
    assert d["pages"] == engine.manager.request_pages(engine.plan_for("full", 1.0)) and d["policy"] == "full"
    bad = worker.page_demand("nope", None)
    assert bad["field"] == "policy" and bad["error"].startswith("policy: ") and "nope" in bad["error"]


def test_scheduler_demand_matches_the_engine_for_every_policy_without_asking_a_worker(worker):
    from memory.policy_names import POLICIES

    engine = worker.engine
    calc = DemandCalculator("var-micro", ENGINE)
    for policy in POLICIES:
        for budget in (None, 0.05, 0.3, 1.0):
            want = worker.page_demand(policy, budget)
            got = calc.demand(policy, budget, engine.pool.block_size, engine.pool.num_pages)
            assert ("pages" in got) == ("pages" in want), (policy, budget, got, want)
            if "pages" in got:
                assert got["pages"] == want["pages"], (policy, budget)
            else:
                assert got["field"] == want["field"]
    t0 = time.perf_counter()
    for i in range(300):  # unknown names cost nothing and are not cached
        assert calc.demand(f"nope-{i}", None, 4, 100)["field"] == "policy"
    for i in range(300):
        calc.demand("full", 0.001 + i / 400, 4, 10**6)
    assert time.perf_counter() - t0 < 5 and len(calc._cache) <= 256


def test_worker_keeps_results_until_acknowledged_and_cancel_returns_pages(worker):
    worker.submit([_wire(40), _wire(41)], worker.incarnation)
    got, deadline = [], time.monotonic() + 60
    while len(got) < 2 and time.monotonic() < deadline:
        got = worker.poll(0.5, ack=0)["results"]  # nothing acknowledged: the same results again
    again = worker.poll(0.1, ack=0)
    assert sorted(r["key"] for r in again["results"]) == ["job/q40", "job/q41"]
    assert {"job/q40", "job/q41"} <= set(worker.hello()["held_keys"])  # a restarted scheduler reclaims these
    assert worker.poll(0.1, ack=again["last"])["results"] == []
    assert worker.hello()["held_keys"] == []
    keys = [f"job/q{i}" for i in range(50, 80)]
    worker.pause()  # the paused loop moves the requests into the engine but never steps it
    try:
        worker.submit([_wire(i) for i in range(50, 80)], worker.incarnation)
        deadline = time.monotonic() + 30
        while worker.stats()["engine"]["num_requests_waiting"] < len(keys):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with worker._engine_lock:  # admit (reserve pages) without stepping: running requests to cancel
            worker.engine._admit()
        held = worker.stats()["engine"]
        out = worker.cancel(keys)
    finally:
        worker.resume()
    assert held["reserved_pages"] > 0 and out["pages_freed"] == held["reserved_pages"]
    st = worker.stats()["engine"]
    assert st["used"] == 0 and st["available_pages"] == st["num_pages"] and st["requests_reserved"] == 0
    results = _drain(worker, 30)
    assert sorted(r["key"] for r in results) == sorted(keys)  # each exactly once: an image or "cancelled"
    assert sum(not r["ok"] for r in results) == out["cancelled"] and all(
        r["error"] == "cancelled" for r in results if not r["ok"])


def test_bad_request_reaching_a_worker_comes_back_as_an_error(worker):
    worker.submit([_wire(30).model_copy(update={"class_label": 99})])
    (r,) = _drain(worker, 1)
    assert not r["ok"] and r["error"].startswith("class_label") and r["png"] is None


def test_shutdown_fails_queued_work_and_returns_every_page():
    w = Worker(WorkerConfig(model="var-micro", random_init=True, engine=ENGINE, threads=1), "w1", metrics=False)
    w.pause()
    w.submit([_wire(i) for i in range(3)])
    time.sleep(0.2)
    out = w.shutdown()
    assert out["aborted"] == 3 and out["stats"]["engine"]["used"] == 0
    assert out["stats"]["engine"]["requests_reserved"] == 0
