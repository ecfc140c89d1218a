"""Infinity through a local Ray cluster: a job file of prompts (two aspect ratios, a negative
prompt, a bad record) served by one infinity-micro worker that encodes the prompts itself with a
tiny random T5, giving the same tokens as the in-process engine; every page back afterwards."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")

from engine.api import make_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.models.registry import build_model  # noqa: E402
from engine.request import ImageRequest  # noqa: E402
from scheduler.client import ClusterClient, ensure_ray  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from tests.tiny_t5 import write_tiny_t5  # noqa: E402
from workers.config import WorkerConfig  # noqa: E402


def test_a_job_file_of_prompts_runs_on_the_cluster_like_the_local_engine(tmp_path):
    t5 = write_tiny_t5(tmp_path / "t5")
    engine_cfg = EngineConfig(dtype="float32", block_size=4, kv_pool_bytes=4 << 20, text_encoder=str(t5))
    records = [
        {"prompt": "a red ring", "num": 2, "seed": 10, "request_id": "ring"},
        {"prompt": "a blue dog on the grass", "aspect_ratio": "1:2", "negative_prompt": "blurry", "cfg": 2.0,
         "tau": 0.8, "request_id": "dog"},
        {"prompt": "big sea", "resolution": "tiny", "h_div_w": 0.5, "seed": 3, "request_id": "sea"},
        {"class_label": 3, "request_id": "bad"},  # a class label for a text-to-image model
        {"prompt": "x", "resolution": "4M", "request_id": "bad-res"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ensure_ray(None, num_cpus=2)
    client = ClusterClient.start(SchedulerConfig(
        name="scalekv-test-infinity", num_workers=1,
        worker=WorkerConfig(model="infinity-micro", random_init=True, seed=0, engine=engine_cfg)), detached=False)
    try:
        job = client.submit_file(path)
        assert job["total"] == 6 and job["queued"] == 4 and job["rejected"] == 2
        results = {r["request_id"]: r for r in client.stream(job, timeout=120)}
        assert set(results) == {"ring-0", "ring-1", "dog", "sea", "bad", "bad-res"}
        assert results["bad"]["fields"] == ["class_label", "prompt"] and not results["bad"]["ok"]
        assert results["bad-res"]["fields"] == ["resolution"]
        ok = [results[k] for k in ("ring-0", "ring-1", "dog", "sea")]
        assert all(r["ok"] for r in ok), [r["error"] for r in ok]
        assert results["dog"]["stats"]["schedule"][-1] == [6, 3]
        assert results["sea"]["stats"]["schedule"][-1] == [2, 4]
        (stats,) = client.worker_stats().values()
        eng = stats["engine"]
        assert eng["used"] == 0 and eng["requests_reserved"] == 0 and eng["available_pages"] == eng["num_pages"]
    finally:
        client.stop()
        ray.shutdown()
    local = make_engine(build_model("infinity-micro", random_init=True, seed=0), engine_cfg)
    reqs = [ImageRequest(prompt="a red ring", seed=10, request_id="ring-0"),
            ImageRequest(prompt="a red ring", seed=11, request_id="ring-1"),
            ImageRequest(prompt="a blue dog on the grass", aspect_ratio="1:2", negative_prompt="blurry", cfg=2.0,
                         tau=0.8, request_id="dog"),
            ImageRequest(prompt="big sea", resolution="tiny", h_div_w=0.5, seed=3, request_id="sea")]
    for r in local.generate(reqs):
        assert results[r.request_id]["tokens"] == r.tokens, r.request_id
        assert results[r.request_id]["prompt"] == r.prompt
