"""Per-scale previews and abort in the in-process engine and the worker (no Ray, var-micro)."""

from __future__ import annotations

import time

import numpy as np

from engine.api import EngineConfig, ImageEngine
from engine.request import ImageRequest
from workers.config import WorkerConfig
from workers.worker import Worker

ENGINE = EngineConfig(dtype="float32", block_size=4, kv_pool_bytes=4 << 20)


def test_previews_every_scale_and_every_k_leave_tokens_and_image_unchanged(micro_model):
    engine = ImageEngine(micro_model, ENGINE)
    plain = engine.generate([ImageRequest(class_label=1, seed=5, request_id="a")])[0]
    assert engine.take_previews() == [] and engine.num_previews == 0
    scales = micro_model.spec.var.num_scales
    for k, want in ((1, list(range(scales - 1))), (2, [1])):
        res = engine.generate([ImageRequest(class_label=1, seed=5, request_id="a", preview_every=k)])[0]
        prev = engine.take_previews()
        assert [p.scale for p in prev] == want  # the last scale is the result itself
        assert res.tokens == plain.tokens and np.array_equal(res.image, plain.image)
        assert all(p.image.shape == plain.image.shape and p.image.dtype == np.uint8 for p in prev)
    assert engine.stats()["num_previews"] == scales - 1 + 1


def test_abort_returns_pages_of_a_running_and_a_waiting_request(micro_model):
    engine = ImageEngine(micro_model, ENGINE)
    engine.add_request(ImageRequest(class_label=0, seed=1, request_id="run"))
    engine.step()
    engine.add_request(ImageRequest(class_label=0, seed=2, request_id="wait"))
    assert engine.pool.num_used > 0
    run, wait, nothing = (engine.abort(key) for key in ("run", "wait", "nothing"))
    assert nothing is None and run[1] > 0 and wait[1] == 0  # pages it had reserved: the waiting one none
    out = [run[0], wait[0]]
    assert sorted(r.request_id for r in out) == ["run", "wait"] and all(r.error == "cancelled" for r in out)
    assert engine.pool.num_used == 0 and engine.manager.num_reserved_requests == 0 and not engine.has_unfinished()


def test_worker_sends_previews_keeps_the_request_held_and_cancels():
    w = Worker(WorkerConfig(model="var-micro", random_init=True, engine=ENGINE, threads=1), metrics=False)
    try:
        req = ImageRequest(class_label=2, seed=3, request_id="r0", job_id="j", preview_every=1)
        w.submit([req])
        got, deadline = [], 50
        while not any(not r.get("preview") for r in got) and deadline:
            got += w.poll(0.5)["results"]
            deadline -= 1
        assert [r["scale"] for r in got if r.get("preview")] == [0, 1, 2]
        assert got[-1]["ok"] and got[-1]["key"] == "j/r0" and w.stats()["held"] == 0
        w.pause()
        w.submit([ImageRequest(class_label=2, seed=4, request_id="r1", job_id="j")])
        w.submit([ImageRequest(class_label=2, seed=5, request_id="r2", job_id="j")])
        time.sleep(0.3)  # the paused loop moves r1/r2 into the engine (queued, not stepped)
        assert w.cancel(["j/r1", "j/r2", "j/not-here"])["cancelled"] == 2
        res = []
        while len(res) < 2:
            res += w.poll(1.0)["results"]
        assert sorted((r["key"], r["error"]) for r in res) == [("j/r1", "cancelled"), ("j/r2", "cancelled")]
        assert w.stats()["engine"]["used"] == 0 and w.stats()["held"] == 0
    finally:
        w.shutdown()
