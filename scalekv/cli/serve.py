"""``scalekv serve``: the OpenAI-compatible HTTP server (``scheduler/http.py``) on a cluster."""

from __future__ import annotations

import argparse
import os
import sys

from . import args as shared

SERVE_HELP = """Serve the cluster over HTTP: OpenAI Images API, a page at /, Prometheus /metrics.

Which cluster: --address HOST:PORT (or auto) joins a running one (`scalekv cluster start`);
without it, the cluster `scalekv cluster start` recorded in the state file if it is up, else a
private local Ray instance with a scheduler and --workers workers (model and engine flags as
`cluster start`), stopped when the server stops.

  scalekv serve --port 8000 --api-key sk-local
  curl -s 127.0.0.1:8000/v1/images/generations -H 'Authorization: Bearer sk-local' \\
      -H 'Content-Type: application/json' -d '{"prompt": "ring-striped", "n": 2, "seed": 3}'

Routes: POST /v1/images/generations (stream: true for per-scale previews as server-sent
events), GET /v1/models, GET /health, GET /metrics, GET / (the page). /v1 routes need
`Authorization: Bearer KEY` when --api-key (or $SCALEKV_API_KEY) is set.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from scheduler.config import DEFAULT_NAME

    s = shared.add_parser(sub, "serve", "OpenAI-compatible HTTP server (images, streaming previews, metrics, page)",
                          description=SERVE_HELP)
    h = s.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    h.add_argument("--port", type=int, default=8000, help="port to bind")
    h.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $SCALEKV_API_KEY, else none)")
    h.add_argument("--max-pending", type=int, default=256,
                   help="images waiting or running through this server before new requests get 429")
    h.add_argument("--max-n", type=int, default=16, help="most images one request may ask for")
    h.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before an unfinished request is cancelled and answered 503")
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    c = s.add_argument_group("cluster")
    c.add_argument("--address", default=None,
                   help="Ray cluster of a running scalekv scheduler: 'auto' or HOST:PORT (default: the recorded "
                        "cluster if up, else a private local one)")
    c.add_argument("--name", default=DEFAULT_NAME, help="scheduler actor name")
    c.add_argument("--workers", type=int, default=None, help="local cluster: worker actors (default: 1 per GPU or 1)")
    c.add_argument("--num-cpus", type=int, default=None, help="local cluster: CPUs Ray may use (default: all)")
    c.add_argument("--cpus-per-worker", type=float, default=None, help="local cluster: Ray CPUs per CPU worker")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="local cluster: where workers run")
    c.add_argument("--max-restarts", type=int, default=3, help="local cluster: Ray restarts of a dead worker")
    c.add_argument("--max-attempts", type=int, default=3, help="local cluster: tries of a request whose worker dies")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers to come up")
    shared.add_model_args(s)
    shared.add_threads(s, "local cluster: torch threads per CPU worker (default: its share of the cores)")
    shared.add_engine_args(s)
    s.set_defaults(func=cmd_serve)


def connect_or_start(args: argparse.Namespace):
    """(client, owned): the cluster at --address, the recorded one if it answers, else a new
    private local one (``owned``: stop it when the server stops)."""
    from scheduler.client import ClusterClient, ensure_ray, read_state

    from .cluster import _pid_alive, _scheduler_config

    if args.address is not None:
        return ClusterClient.connect(args.address, args.name), False
    state = read_state()
    if state.get("address") and (not state.get("keeper_pid") or _pid_alive(state["keeper_pid"])):
        try:
            return ClusterClient.connect(state["address"], args.name), False
        except ConnectionError as e:
            print(f"scalekv serve: the recorded cluster does not answer ({e}); starting a local one",
                  file=sys.stderr)
    config = _scheduler_config(args)
    ensure_ray(None, num_cpus=args.num_cpus)
    return ClusterClient.start(config, detached=False, timeout=args.timeout), True


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from scheduler.http import ServeSettings, create_app
    except ImportError as e:
        print(f"scalekv serve: error: {e.name} is not installed: pip install -e '.[serve]'", file=sys.stderr)
        return 2

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"scalekv serve: note: binding {args.host}, reachable beyond this machine"
              + ("" if (args.api_key or os.environ.get("SCALEKV_API_KEY")) else " with no --api-key"),
              file=sys.stderr)
    try:
        client, owned = connect_or_start(args)
    except (ConnectionError, RuntimeError) as e:
        print(f"scalekv: error: {e}", file=sys.stderr)
        return 2
    settings = ServeSettings(api_key=args.api_key or os.environ.get("SCALEKV_API_KEY") or None,
                             max_pending=args.max_pending, max_n=args.max_n, request_timeout_s=args.request_timeout)
    try:
        app = create_app(client, settings)
        model = (client.status().get("model") or {}).get("model")
        print(f"scalekv serve: {model} on http://{args.host}:{args.port}/ "
              f"({'API key required' if settings.api_key else 'no API key'}); Ctrl-C stops"
              + (" the server and its local cluster" if owned else ""), file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a graceful shutdown
        pass
    finally:
        if owned:
            client.stop()
    return 0
