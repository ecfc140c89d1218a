"""``scalekv serve``: an OpenAI-compatible HTTP front end (FastAPI + uvicorn) on the scheduler.

Why FastAPI + uvicorn and not Ray Serve: Ray Serve brings its own router, replicas and queue,
so requests would be queued and routed twice, while the scheduler must stay the one place that
queues and routes (by free KV pages). This server is a thin translator: it validates a request
with the one validator, submits it as a job, and turns the job's results into an HTTP answer.

Routes (``/v1/*`` need ``Authorization: Bearer KEY`` when the server has an API key, as
``vllm serve --api-key``; ``/``, ``/health``, ``/metrics`` and image files do not):

- ``POST /v1/images/generations``: OpenAI Images API (see ``openai_api.py``); ``"stream": true``
  answers server-sent events: ``image_generation.partial_image`` per previewed scale, then
  ``image_generation.completed`` per image, then ``data: [DONE]``.
- ``GET /v1/models``, ``GET /health`` (cluster and pool state; 503 without a live worker),
  ``GET /metrics`` (Prometheus, ``prometheus.py``), ``GET /`` (the page, ``static/index.html``),
  ``GET /v1/images/files/{id}.png`` (``response_format="url"``; kept in memory, newest
  ``URL_IMAGES_KEPT``, ids are random).

Results reach requests through one ``ResultPump`` thread: it long-polls the scheduler for every
open job at once (``Scheduler.get_results_multi``) and hands each result to its request's
asyncio queue. A client that disconnects (or times out) cancels its job: queued images are
dropped and running ones aborted by their workers, whose pages return to the pool. Admission
control: at most ``max_pending`` images waiting or running through this server; beyond that a
request is answered 429 at once (never queued without bound, never left hanging), and 503 when
no worker is alive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .openai_api import APIError, GenerationCall, extension, field_error, image_index, parse_generation
from .prometheus import ServerMetrics, StatusCache, cluster_summary

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
URL_IMAGES_KEPT = 512
POLL_WAIT_S = 0.25


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_pending: int = 256  # images waiting or running through this server before 429
    max_n: int = 16  # images per request
    request_timeout_s: float = 600.0  # a request not done by then is cancelled and answered 503


# ----- results: one thread long-polls the scheduler for every open job ----------------------
@dataclass
class _Waiter:
    job_id: str
    n: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    t_arrival: float
    orphan: bool = False  # the client went away: drain the job's results, answer nobody
    first_scale: dict = field(default_factory=dict)  # request id -> seconds to its first preview
    left: int = 0


class ResultPump:
    """Fans the scheduler's results out to the requests waiting for them (see the module doc)."""

    DONE = object()

    def __init__(self, client, metrics: ServerMetrics) -> None:
        self.client, self.metrics = client, metrics
        self._lock = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scalekv-http-pump", daemon=True)
        self._thread.start()

    @property
    def pending_images(self) -> int:
        with self._lock:
            return sum(w.left for w in self._waiters.values())

    def register(self, job_id: str, n: int, t_arrival: float, limit: int) -> _Waiter | None:
        """Wait for job ``job_id`` (about to be submitted: the scheduler leaves it out of the
        answers until it exists). None when ``n`` more images would pass ``limit``."""
        w = _Waiter(job_id, n, asyncio.get_running_loop(), asyncio.Queue(), t_arrival, left=n)
        with self._lock:
            if sum(x.left for x in self._waiters.values()) + n > limit:
                return None
            self._waiters[job_id] = w
        self._wake.set()
        return w

    def unregister(self, job_id: str) -> None:
        """The job's submit failed: nothing to wait for."""
        with self._lock:
            self._waiters.pop(job_id, None)

    def abandon(self, job_id: str, reason: str = "client disconnected") -> None:
        """The request's client is gone: cancel the job (in the background) and drain it."""
        with self._lock:
            w = self._waiters.get(job_id)
            if w is None or w.orphan:
                return
            w.orphan = True
        log.info("job %s: %s, cancelling it", job_id, reason)

        def cancel() -> None:
            try:
                self.client.cancel(job_id)
            except Exception as e:  # the job finished meanwhile, or the scheduler is gone
                log.info("cancel of job %s: %s", job_id, e)

        threading.Thread(target=cancel, name=f"cancel-{job_id}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ids = list(self._waiters)
            if not ids:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                batches = self.client.get_results_multi(ids, max_wait=POLL_WAIT_S)
            except Exception as e:  # the scheduler died: every open request fails now, none hangs
                log.error("results poll failed: %s", e)
                with self._lock:
                    waiters = [self._waiters.pop(j) for j in ids if j in self._waiters]
                for w in waiters:
                    self._deliver(w, APIError(503, f"the scheduler is unreachable: {type(e).__name__}: {e}"))
                time.sleep(0.2)
                continue
            for job_id, batch in batches.items():
                with self._lock:
                    w = self._waiters.get(job_id)
                if w is None:
                    continue
                for res in batch["results"]:
                    self._note(w, res)
                    if not w.orphan:
                        self._deliver(w, res)
                if batch.get("done"):
                    with self._lock:
                        self._waiters.pop(job_id, None)
                    if not w.orphan:
                        self._deliver(w, self.DONE)

    def _note(self, w: _Waiter, res: dict) -> None:
        """Metrics of one result as it arrives (also for orphaned jobs)."""
        now = time.monotonic()
        rid = res.get("request_id", "")
        if res.get("preview"):
            w.first_scale.setdefault(rid, now - w.t_arrival)
            return
        with self._lock:
            w.left -= 1
        res["_e2e_s"] = e2e = now - w.t_arrival
        ttfs = w.first_scale.get(rid)
        stats = res.get("stats") or {}
        if ttfs is None and "first_scale_seconds" in stats and res.get("seconds"):
            ttfs = e2e - (float(res["seconds"]) - float(stats["first_scale_seconds"]))
        res["_ttfs_s"] = ttfs
        if res.get("ok"):
            self.metrics.image_done(e2e, ttfs)
        elif (res.get("error") or "").startswith("cancelled"):  # other errors are counted as answered
            self.metrics.error("cancelled")

    @staticmethod
    def _deliver(w: _Waiter, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed (server stopping)
            w.loop.call_soon_threadsafe(w.queue.put_nowait, item)


# ----- the app ---------------------------------------------------------------------------------
def create_app(client, settings: ServeSettings | None = None):
    """The FastAPI app on a ``ClusterClient`` (whose scheduler is up)."""
    from engine.models.catalog import get_spec
    from engine.request import FieldError
    from memory.policy_names import POLICIES

    settings = settings or ServeSettings()
    status = StatusCache(lambda: client.status())
    first = client.status()
    info = dict(first.get("model") or {})
    if not info:
        info = dict(client.wait_ready().get("model") or {})
    model = info["model"]
    spec = get_spec(model)
    image_size = spec.vae.image_size
    metrics = ServerMetrics(model, status)
    pump = ResultPump(client, metrics)
    started = int(time.time())
    files: OrderedDict[str, bytes] = OrderedDict()
    files_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pump.stop()

    app = FastAPI(title="scalekv", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.settings, app.state.pump, app.state.metrics, app.state.client = settings, pump, metrics, client
    app.state.status = status

    def error_response(e: APIError) -> JSONResponse:
        metrics.error(e.type)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail), type_="not_found_error"
                                       if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        param = str(errs[0]["loc"][-1]) if errs and errs[0].get("loc") else None
        return error_response(APIError(400, "; ".join(str(x.get("msg")) for x in errs), param=param))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if settings.api_key and path.startswith("/v1/") and not path.startswith("/v1/images/files/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                       settings.api_key.encode()):
                return error_response(APIError(401, "Invalid or missing API key: send Authorization: Bearer KEY",
                                               code="invalid_api_key"))
        return await call_next(request)

    # ----- routes --------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/health")
    def health():
        st = status.get()
        if st is None:
            return JSONResponse({"status": "unavailable", "error": status.error}, status_code=503)
        s = cluster_summary(st)
        body = {"status": "ok" if s["workers"].get("alive") else "unavailable", "model": model,
                "workers": s["workers"], "queue_depth": s["queue_depth"], "running": s["running"],
                "waiting": s["waiting"], "server_pending_images": pump.pending_images,
                "max_pending": settings.max_pending,
                "pool": {"num_pages": s["num_pages"], "used": s["used"], "reserved": s["reserved"],
                         "drafter": s["drafter"], "refiner": s["refiner"],
                         "usage": round(s["used"] / s["num_pages"], 4) if s["num_pages"] else 0.0}}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": started, "owned_by": "scalekv",
            "scalekv": {"class_names": info.get("class_names"), "num_classes": info.get("num_classes"),
                        "num_scales": info.get("num_scales"), "image_size": image_size,
                        "size": f"{image_size}x{image_size}", "default_policy": info.get("default_policy"),
                        "default_kv_budget": info.get("default_kv_budget"), "policies": list(POLICIES),
                        "num_pages": info.get("num_pages"), "page_bytes": info.get("page_bytes"),
                        "block_size": info.get("block_size")},
        }]}

    @app.get("/v1/images/files/{name}")
    def image_file(name: str) -> Response:
        with files_lock:
            png = files.get(name.removesuffix(".png"))
        if png is None:
            raise APIError(404, f"no image {name!r} (images are kept in memory, the newest {URL_IMAGES_KEPT})",
                           param="name", type_="not_found_error")
        return Response(png, media_type="image/png")

    def store(png: bytes) -> str:
        key = uuid.uuid4().hex
        with files_lock:
            files[key] = png
            while len(files) > URL_IMAGES_KEPT:
                files.popitem(last=False)
        return key

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        t_arrival = time.monotonic()
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not JSON: {e}") from None
        call = parse_generation(body, model, image_size, info.get("class_names"), info["num_classes"],
                                settings.max_n)
        st = status.get()
        if st is None or not cluster_summary(st)["workers"].get("alive"):
            raise APIError(503, "no live worker: the cluster is down or starting", headers={"Retry-After": "5"})
        job_id = f"http-{uuid.uuid4().hex[:16]}"
        waiter = pump.register(job_id, call.n, t_arrival, settings.max_pending)
        if waiter is None:
            raise APIError(429, f"the server queue is full ({pump.pending_images} images waiting or running, "
                                f"limit {settings.max_pending}): retry later", headers={"Retry-After": "1"})
        try:
            await run_in_threadpool(client.submit, [call.record], "http", job_id)
        except ValueError as e:
            pump.unregister(job_id)
            name, _, reason = str(e).partition(": ")
            raise field_error([FieldError(name, reason)], call.prompt_is_class) from None
        except Exception as e:  # no live worker, scheduler gone
            pump.unregister(job_id)
            raise APIError(503, f"the cluster cannot take requests: {type(e).__name__}: {e}",
                           headers={"Retry-After": "5"}) from None
        policy = call.policy or info.get("default_policy") or "default"
        if policy in POLICIES:  # a bad name is answered 400 (and must not grow the label set)
            metrics.requested(policy, call.n)
        if call.stream:
            return StreamingResponse(_stream(request, waiter, call), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, waiter, call)

    async def _next(request: Request, waiter: _Waiter, deadline: float):
        """The job's next result, or None when the client went away (the job is cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(waiter.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    pump.abandon(waiter.job_id)
                    return None
                if time.monotonic() > deadline:
                    pump.abandon(waiter.job_id, "request timed out")
                    raise APIError(503, f"the request did not finish within {settings.request_timeout_s:g}s "
                                        "and was cancelled") from None

    def _failure(results: list[dict], call: GenerationCall) -> APIError | None:
        bad = [r for r in results if not r.get("ok")]
        if not bad:
            return None
        r = bad[0]
        fields = r.get("fields") or []
        if fields:
            reason = (r.get("error") or "").split(": ", 1)[-1]
            return field_error([FieldError(fields[0], reason)], call.prompt_is_class)
        return APIError(500, f"generation failed: {r.get('error')}")

    async def _collect(request: Request, waiter: _Waiter, call: GenerationCall):
        deadline = waiter.t_arrival + settings.request_timeout_s
        results: list[dict] = []
        while True:
            item = await _next(request, waiter, deadline)
            if item is None:
                return Response(status_code=499)  # nobody reads it
            if isinstance(item, APIError):
                raise item
            if item is ResultPump.DONE:
                break
            if not item.get("preview"):
                results.append(item)
        err = _failure(results, call)
        if err is not None:
            raise err
        results.sort(key=lambda r: image_index(r["request_id"], call.n))
        data = []
        for r in results:
            ext = extension(r, r.get("_e2e_s"), r.get("_ttfs_s"))
            if call.response_format == "url":
                item = {"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{store(r['png'])}.png"}
            else:
                item = {"b64_json": base64.b64encode(r["png"]).decode()}
            data.append({**item, "revised_prompt": None, "scalekv": ext})
        return {"created": int(time.time()), "data": data, "output_format": "png",
                "size": f"{image_size}x{image_size}", "model": model, "scalekv": {"job_id": waiter.job_id}}

    async def _stream(request: Request, waiter: _Waiter, call: GenerationCall) -> AsyncIterator[bytes]:
        deadline = waiter.t_arrival + settings.request_timeout_s
        num_scales = info.get("num_scales")
        finished = False

        def event(kind: str, payload: dict) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

        try:
            while True:
                try:
                    item = await _next(request, waiter, deadline)
                except APIError as e:
                    metrics.error(e.type)
                    yield event("error", e.body())
                    break
                if item is None:
                    return
                if isinstance(item, APIError):
                    metrics.error(item.type)
                    yield event("error", item.body())
                    break
                if item is ResultPump.DONE:
                    finished = True
                    yield b"data: [DONE]\n\n"
                    break
                idx = image_index(item["request_id"], call.n)
                if item.get("preview"):
                    metrics.preview_sent()
                    yield event("image_generation.partial_image", {
                        "b64_json": base64.b64encode(item["png"]).decode(), "index": idx,
                        "partial_image_index": item["scale"], "scale": item["scale"], "num_scales": num_scales,
                        "created_at": int(time.time()), "output_format": "png"})
                    continue
                if not item.get("ok"):
                    err = _failure([item], call)
                    metrics.error(err.type)
                    yield event("error", {**err.body(), "index": idx})
                    continue
                yield event("image_generation.completed", {
                    "b64_json": base64.b64encode(item["png"]).decode(), "index": idx,
                    "scale": (num_scales or 1) - 1, "num_scales": num_scales, "created_at": int(time.time()),
                    "output_format": "png", "size": f"{image_size}x{image_size}",
                    "scalekv": extension(item, item.get("_e2e_s"), item.get("_ttfs_s"))})
        finally:  # a client that went away mid-stream (the task is cancelled): cancel its job
            if not finished:
                pump.abandon(waiter.job_id)

    return app


# ----- running it ------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` on a background thread (tests, benchmarks); ``url`` once up."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="scalekv-uvicorn", daemon=True)
        self.host = host
        self.url = ""

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
