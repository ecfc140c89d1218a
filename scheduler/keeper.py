"""Keeper: the background process that owns a local Ray instance for ``scalekv cluster start``.

Why a process of our own rather than ``ray start --head``: a ``ray start`` head registers itself
as this machine's default cluster (``/tmp/ray/ray_current_cluster``), so every later
``ray.init()`` on the machine, including other people's tests, would silently join it, and the
only way to stop it is ``ray stop``, which kills every Ray instance of the user. A Ray instance
started by ``ray.init()`` in this process is reachable by its address, is invisible to other
``ray.init()`` calls, and ends cleanly with ``ray.shutdown()`` when the keeper gets SIGTERM
(``scalekv cluster stop``), taking the detached scheduler and its workers with it.

Loopback by default: with ``--bind 127.0.0.1`` (the default) the keeper runs Ray the way Ray
runs a single-machine instance (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: the node's IP is
127.0.0.1), so the GCS, the raylet, the object manager and every worker listen on 127.0.0.1
only and the recorded address is ``127.0.0.1:PORT``. ``--bind IP`` (a routable address of this
machine) is for clusters other machines join; then protect it with Ray's token auth.

    python -m scheduler.keeper --ready FILE [--num-cpus N] [--num-gpus N] [--bind IP]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scheduler.keeper")
    p.add_argument("--ready", required=True, help="file to write {address, pid} to once Ray is up")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--bind", default="127.0.0.1", help="IP the Ray instance listens on (default: loopback only)")
    p.add_argument("--namespace", default=None)
    args = p.parse_args(argv)
    loopback = args.bind in ("127.0.0.1", "localhost")
    if loopback:  # read by Ray at import: node IP = loopback, every server binds 127.0.0.1
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    import ray

    from .client import REPO_ROOT, keeper_identity
    from .config import NAMESPACE

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    path = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x)
    extra = {} if loopback else {"_node_ip_address": args.bind}
    ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus, namespace=args.namespace or NAMESPACE,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}, **extra)
    address = ray.get_runtime_context().gcs_address
    ready = Path(args.ready)
    tmp = ready.with_suffix(".tmp")
    ident = keeper_identity(os.getpid()) or {}
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), "start": ident.get("start")}))
    tmp.replace(ready)
    print(f"scalekv keeper: Ray at {address} (pid {os.getpid()}); SIGTERM stops it", flush=True)
    while not stop.wait(1.0):
        pass
    print("scalekv keeper: shutting Ray down", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
