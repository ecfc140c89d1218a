"""``scalekv serve`` end to end: a real uvicorn server on loopback in front of a real local Ray
cluster (1 CPU worker, the shipped var-tiny, so the images are real), driven by the official
``openai`` client, httpx, ``scalekv bench load --endpoint`` and headless Chromium.

One cluster and one server serve the module (Ray takes ~8 s to start); every test leaves the
worker's pool all-free, which the autouse fixture checks.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from engine.api import EngineConfig, ImageEngine  # noqa: E402
from engine.models.registry import build_model  # noqa: E402
from engine.request import ImageRequest  # noqa: E402
from scalekv.cli import main  # noqa: E402
from scheduler.client import ClusterClient, ensure_ray  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.http import ServerThread, ServeSettings, create_app  # noqa: E402
from scheduler.prometheus import FAMILIES, cluster_summary  # noqa: E402
from workers.config import WorkerConfig  # noqa: E402

KEY = "sk-test-scalekv"
POOL = "96MiB"
ENGINE = EngineConfig(dtype="float32", kv_pool_bytes=96 << 20)
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "out" / "test_http_serving"


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def served():
    ensure_ray(None, num_cpus=2)
    client = ClusterClient.start(SchedulerConfig(
        num_workers=1, worker=WorkerConfig(model="var-tiny", engine=ENGINE, threads=1)), detached=False)
    app = create_app(client, ServeSettings(api_key=KEY, max_pending=64))
    server = ServerThread(app).start()
    yield server, client, app
    server.stop()
    client.stop()
    ray.shutdown()


@pytest.fixture(autouse=True)
def pool_all_free_after(served):
    yield
    _, client, _ = served
    deadline = time.monotonic() + 60
    while True:
        stats = client.worker_stats()
        eng = [s.get("engine", {}) for s in stats.values()]
        sched = client.status()["scheduler"]
        if all(e.get("used") == 0 and e.get("requests_reserved") == 0 for e in eng) and sched["in_flight"] == 0 \
                and sched["queue_depth"] == 0:
            return
        assert time.monotonic() < deadline, f"pool not all-free after the test: {eng} {sched}"
        time.sleep(0.2)


def _headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _post(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, headers=_headers() if headers is None else headers,
                      timeout=timeout)


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)}


def _value(fams: dict, name: str, suffix: str = "", **labels) -> float:
    fam = fams[name]
    return sum(s.value for s in fam.samples if s.name == name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_openai_client_gets_the_images_scalekv_generate_and_the_engine_make(served, tmp_path):
    openai = pytest.importorskip("openai")
    server, _, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    resp = client.images.generate(model="var-tiny", prompt="ring-striped", n=1, response_format="b64_json",
                                  extra_body={"seed": 3})
    assert len(resp.data) == 1
    ext = resp.data[0].model_extra["scalekv"]
    assert ext["seed"] == 3 and ext["class_label"] == 7  # ring-striped
    image = _png(resp.data[0].b64_json)
    assert image.shape == (64, 64, 3)

    assert main(["generate", "--model", "var-tiny", "--class", "ring-striped", "--seed", "3", "--dtype", "float32",
                 "--kv-pool-bytes", POOL, "--threads", "1", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert ext["tokens"] == rec["tokens"]
    from PIL import Image

    assert np.array_equal(image, np.asarray(Image.open(tmp_path / rec["png"]).convert("RGB")))

    engine = ImageEngine(build_model("var-tiny"), ENGINE)
    ref = engine.generate([ImageRequest(class_label="ring-striped", seed=3, request_id="a")])[0]
    assert ext["tokens"] == ref.tokens and np.array_equal(image, ref.image)


def test_n4_gives_four_images_by_url_with_consecutive_seeds(served):
    openai = pytest.importorskip("openai")
    server, _, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    resp = client.images.generate(model="var-tiny", prompt="2", n=4, response_format="url",
                                  extra_body={"seed": 10, "policy": "full"})
    assert len(resp.data) == 4
    exts = [d.model_extra["scalekv"] for d in resp.data]
    assert [e["seed"] for e in exts] == [10, 11, 12, 13] and {e["class_label"] for e in exts} == {2}
    assert len({tuple(e["tokens"]) for e in exts}) == 4
    for d in resp.data:
        assert d.url.startswith(server.url) and d.b64_json is None
        png = httpx.get(d.url, timeout=30)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "3", "top_p": 2}, 400, "top_p"),
    ({"prompt": "no-such-class"}, 400, "prompt"),
    ({"prompt": "99"}, 400, "prompt"),
    ({"prompt": "3", "class_label": "nope"}, 400, "class_label"),
    ({"prompt": "3", "n": 0}, 400, "n"),
    ({"prompt": "3", "size": "1024x1024"}, 400, "size"),
    ({"prompt": "3", "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": "3", "seed": -1}, 400, "seed"),
    ({"prompt": "3", "kv_budget": 0}, 400, "kv_budget"),
    ({"prompt": "3", "preview_every": 0}, 400, "preview_every"),
    ({"prompt": "3", "policy": "nope"}, 400, "policy"),
    ({"prompt": "3", "colour": "red"}, 400, "colour"),
    ({}, 400, "prompt"),
    ({"prompt": "3", "model": "dall-e-3"}, 404, "model"),
])
def test_bad_fields_answer_openai_errors_naming_the_field(served, body, status, param):
    server, _, _ = served
    r = _post(server.url, body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert err["message"]


def test_openai_client_sees_bad_request_and_auth_errors(served):
    openai = pytest.importorskip("openai")
    server, _, _ = served
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        good.images.generate(model="var-tiny", prompt="3", extra_body={"cfg": "strong"})
    assert e.value.body["param"] == "cfg"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="var-tiny", prompt="3")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _post(server.url, {"prompt": "3"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    r = httpx.post(f"{server.url}/v1/images/generations", content=b"{not json", headers=_headers(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    models = httpx.get(f"{server.url}/v1/models", headers=_headers(), timeout=30).json()
    assert models["data"][0]["id"] == "var-tiny" and "ring-striped" in models["data"][0]["scalekv"]["class_names"]
    health = httpx.get(f"{server.url}/health", timeout=30)  # open, as /metrics and /
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_full_server_queue_answers_429_at_once(served):
    server, _, app = served
    app.state.settings.max_pending = 2
    try:
        t0 = time.monotonic()
        r = _post(server.url, {"prompt": "3", "n": 3}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers.get("retry-after") and time.monotonic() - t0 < 5
    finally:
        app.state.settings.max_pending = 64


def _events(resp: httpx.Response):
    kind = None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield ("done", None) if line == "data: [DONE]" else (kind, json.loads(line[6:]))


def test_stream_yields_one_event_per_scale_in_order_ending_with_the_final_image(served):
    server, _, _ = served
    body = {"prompt": "disk-solid", "seed": 5}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json={**body, "stream": True},
                      headers=_headers(), timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = list(_events(resp))
    assert events[-1] == ("done", None)
    events = events[:-1]
    assert [k for k, _ in events] == ["image_generation.partial_image"] * 9 + ["image_generation.completed"]
    assert [e["scale"] for _, e in events] == list(range(10))
    images = [_png(e["b64_json"]) for _, e in events]
    assert all(im.shape == (64, 64, 3) for im in images)
    plain = _post(server.url, body).json()["data"][0]
    assert events[-1][1]["b64_json"] == plain["b64_json"]  # previews do not change the image
    assert events[-1][1]["scalekv"]["tokens"] == plain["scalekv"]["tokens"]
    # the image sharpens: each preview is closer to the final image than the coarsest one
    err = [float(np.abs(im.astype(int) - images[-1].astype(int)).mean()) for im in images]
    assert err[-1] == 0 and err[-2] < err[0]
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json={**body, "stream": True,
                      "preview_every": 4}, headers=_headers(), timeout=120) as resp:
        scales = [e["scale"] for k, e in _events(resp) if k != "done"]
    assert scales == [3, 7, 9]


def test_a_client_that_disconnects_cancels_its_request_and_its_pages_return(served):
    server, client, _ = served
    before = _value(_metrics(server.url), "scalekv:request_errors", "_total", type="cancelled")
    with httpx.stream("POST", f"{server.url}/v1/images/generations",
                      json={"prompt": "3", "n": 2, "seed": 1, "stream": True}, headers=_headers(),
                      timeout=120) as resp:
        for kind, _ in _events(resp):
            assert kind == "image_generation.partial_image"
            break  # both images are running now, holding pages
        # the workers' last snapshots (worker_stats() would wait for the engine to go idle)
        assert cluster_summary(client.status())["used"] > 0
    deadline = time.monotonic() + 30  # the autouse fixture checks the pool is all-free again
    while _value(_metrics(server.url), "scalekv:request_errors", "_total", type="cancelled") < before + 2:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.2)


def test_metrics_have_the_documented_families_and_move_under_load(served):
    server, _, _ = served
    m0 = _metrics(server.url)
    assert set(FAMILIES) <= set(m0), set(FAMILIES) - set(m0)
    assert _value(m0, "scalekv:kv_cache_pages", state="total") > 0
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=_post(server.url, {"prompt": "4", "n": 3, "seed": 20,
                                                                        "policy": "full"})))
    t.start()
    running = usage = 0.0
    while t.is_alive():
        m = _metrics(server.url)
        running = max(running, _value(m, "scalekv:num_requests_running"))
        usage = max(usage, _value(m, "scalekv:kv_cache_usage_perc"))
        time.sleep(0.2)
    t.join()
    assert out["r"].status_code == 200
    m1 = _metrics(server.url)
    assert running >= 1 and 0 < usage <= 1
    assert _value(m1, "scalekv:images_generated", "_total") == _value(m0, "scalekv:images_generated", "_total") + 3
    assert _value(m1, "scalekv:e2e_request_latency_seconds", "_count") == \
        _value(m0, "scalekv:e2e_request_latency_seconds", "_count") + 3
    assert _value(m1, "scalekv:time_to_first_scale_seconds", "_count") >= \
        _value(m0, "scalekv:time_to_first_scale_seconds", "_count") + 3
    assert _value(m1, "scalekv:request_policy", "_total", policy="full") >= \
        _value(m0, "scalekv:request_policy", "_total", policy="full") + 3
    assert _value(m1, "scalekv:num_preemptions", "_total") == 0
    deadline = time.monotonic() + 10  # the gauge follows the workers' stats, sent with their next poll
    while _value(m1, "scalekv:kv_cache_usage_perc") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        m1 = _metrics(server.url)
    assert _value(m1, "scalekv:kv_cache_usage_perc") == 0  # all pages back


def test_bench_load_over_http_reports_the_table_and_goodput(served, tmp_path, capsys):
    server, _, _ = served
    report = tmp_path / "load.json"
    rc = main(["bench", "load", "--endpoint", server.url, "--api-key", KEY, "--num-requests", "3",
               "--max-concurrency", "2", "--goodput", "e2e:600", "--warmup", "0", "--seed", "1",
               "--sample-interval", "0.2", "--report", str(report)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "var-tiny (http)" in text and "goodput (SLOs: e2e <= 600s)" in text and "3/3 met" in text
    assert "set by --max-concurrency 2" in text  # 2 in flight, pool far from full
    rep = json.loads(report.read_text())
    s = rep["runs"][0]["summary"]
    assert s["completed"] == 3 and s["goodput"]["good"] == 3 and s["client_in_flight_peak"] == 2
    assert s["e2e_s"]["p50"] > 0 and s["ttfs_s"]["p50"] is not None and s["kv_peak_pages"] > 0


@pytest.mark.skipif(shutil.which(CHROMIUM) is None and shutil.which("chromium") is None,
                    reason="no Chromium binary (install Debian's chromium: apt-get install -y chromium)")
def test_the_page_generates_an_image_in_headless_chromium(served):
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    server, _, _ = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which(CHROMIUM) or shutil.which("chromium"),
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#cls option[value='7']", state="attached", timeout=30_000)
            page.wait_for_load_state("networkidle")
            page.select_option("#cls", "7")
            page.fill("#seed", "3")
            page.click("#go")
            page.wait_for_selector("#canvas[data-final='true']", timeout=90_000)
            page.wait_for_function("document.getElementById('s-workers').textContent === '1'", timeout=10_000)
            assert page.inner_text("#error") == ""
            assert "final image (scale 10/10)" in page.inner_text("#progress")
            assert page.input_value("#cls") == "7"
            src = page.get_attribute("#canvas", "src")
            page.screenshot(path=str(SHOTS / "page.png"))
        finally:
            browser.close()
    ref = _post(server.url, {"prompt": "ring-striped", "seed": 3}).json()["data"][0]["b64_json"]
    assert src == "data:image/png;base64," + ref
