"""Cluster pieces without Ray: routing by free pages, and the Worker class driven in-process."""

from __future__ import annotations

import time

import pytest

from engine.api import EngineConfig, ImageEngine
from engine.models.registry import build_model
from engine.request import FieldError, ImageRequest, ImageResult, RecordError
from scheduler.jobs import Item, JobTable
from scheduler.routing import WorkerView, pick_worker, route
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


def test_job_table_returns_each_result_once_and_retires_finished_jobs():
    table = JobTable()
    job = table.create("j1", "test", 3)
    with pytest.raises(ValueError, match="job_id"):
        table.create("j1", "again", 1)
    item = Item("j1", ImageRequest(request_id="a", class_label=1, seed=2, job_id="j1"), demand=8, t_submitted=0.0,
                t_queued=0.0)
    ok = ImageResult("a", 1, 2, job_id="j1", tokens=[1], stats={"worker": "w0"}).to_record(png=b"x")
    assert table.add_result("j1", "a", ok, item)
    assert not table.add_result("j1", "a", dict(ok, stats={"worker": "w1"}), item)  # second run
    assert table.add_result("j1", "b", None, None, error="class_label: unknown class 99")
    table.add_error(job, RecordError("c", 2, (FieldError("cfg", "must be finite"),)))
    first = table.take(job, max_results=2)
    assert [r["request_id"] for r in first["results"]] == ["a", "b"] and not first["done"]
    assert first["results"][0]["stats"]["worker"] == "w0" and first["results"][1]["fields"] == ["class_label"]
    assert set(first["results"][0]) == set(first["results"][1])  # one schema for images and errors
    last = table.take(job, max_results=10)
    assert [r["fields"] for r in last["results"]] == [["cfg"]] and last["done"]
    assert "j1" not in table.jobs and table.retired_status("j1")["errors"] == 2 and len(table) == 1
    assert not table.add_result("j1", "a", {}, None)  # a late run of a retired job's request
    assert table.counters == {"results": 3, "errors": 2, "duplicates_dropped": 2}


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
