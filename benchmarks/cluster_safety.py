"""Recovery time after a scheduler kill, and the TCP listeners of a local cluster.

    PYTHONPATH=. python -m benchmarks.cluster_safety [--requests 32] [--kills 3] [--bind IP]

Starts a local cluster with ``scalekv cluster start`` in a temporary state directory (var-micro,
random weights, 2 CPU workers), then:

1. lists every TCP listener of the keeper's process tree (``ss -ltnpH``), by address;
2. runs a job of ``--requests`` images without a fault (the reference), then the same job
   again and kills the scheduler actor (``ray.kill(no_restart=False)``) once the requests are in
   flight; reports the time from the kill until the restarted scheduler answers ``status``, the
   job's wall time with and without the kill, and checks the results (each request once, the
   reference's tokens);
3. stops the cluster.

``--bind IP`` starts the keeper on that address instead of loopback (what the keeper did
before the loopback default: every server on all interfaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cli(state: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALEKV_STATE_DIR=str(state), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "scalekv", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def listeners(root_pid: int) -> list[tuple[str, str]]:
    """(local address, process name) of every TCP listener in root_pid's process tree."""
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                kids.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
    pids, todo = set(), [root_pid]
    while todo:
        q = todo.pop()
        pids.add(q)
        todo.extend(kids.get(q, []))
    out = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        for pid in pids:
            if f"pid={pid}," in line:
                name = line.split('(("', 1)[1].split('"', 1)[0] if '(("' in line else "?"
                out.append((line.split()[3], name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--bind", default=None)
    args = p.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="scalekv-bench-state-"))
    start = ["cluster", "start", "--model", "var-micro", "--random-init", "--workers", "2", "--num-cpus", "2",
             "--threads", "1", "--dtype", "float32", "--block-size", "4", "--kv-pool-bytes", "4MiB"]
    if args.bind:
        start += ["--bind", args.bind]
    r = _cli(state, *start)
    if r.returncode:
        print(r.stdout, r.stderr, file=sys.stderr)
        return 1
    report: dict = {}
    try:
        st = json.loads((state / "cluster.json").read_text())
        socks = listeners(st["keeper_pid"])
        report["address"] = st["address"]
        report["listeners"] = dict(Counter(addr.rsplit(":", 1)[0] for addr, _ in socks))
        report["listeners_by_process"] = sorted({f"{addr.rsplit(':', 1)[0]} {name}" for addr, name in socks})
        if args.kills:
            report.update(_recovery(state, args.requests, args.kills))
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _cli(state, "cluster", "stop")
    print(json.dumps(report, indent=1))
    return 0


def _recovery(state: Path, n: int, kills: int) -> dict:
    import ray

    os.environ["SCALEKV_STATE_DIR"] = str(state)
    from scheduler.client import ClusterClient

    client = ClusterClient.connect()
    recs = [{"class_label": i % 10, "seed": 1000 + i, "request_id": f"q{i}"} for i in range(n)]
    client.run(recs[:4], timeout=120)  # warm-up
    t0 = time.perf_counter()
    ref = {r["request_id"]: r["tokens"] for r in client.run(recs, timeout=600)}
    clean_s = time.perf_counter() - t0
    out = {"requests": n, "job_seconds_no_fault": round(clean_s, 2), "runs": []}
    for k in range(kills):
        t0 = time.perf_counter()
        job = client.submit(recs, job_id=f"kill-{k}")
        while client.status()["scheduler"]["in_flight"] < min(8, n):
            time.sleep(0.01)
        t_kill = time.perf_counter()
        ray.kill(ray.get_actor(client.name, namespace=client.namespace), no_restart=False)
        while True:  # until the new incarnation answers (ray.kill returns before the actor is gone)
            try:
                s = client.status()
                if s["scheduler"]["uptime_s"] <= time.perf_counter() - t_kill + 0.2:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        answered = time.perf_counter() - t_kill
        results = list(client.stream(job, timeout=600))
        total = time.perf_counter() - t0
        ids = [r["request_id"] for r in results]
        out["runs"].append({
            "status_answers_after_kill_s": round(answered, 2), "job_seconds_with_kill": round(total, 2),
            "restored": s["scheduler"]["restored"], "reclaimed": s["scheduler"]["reclaimed"],
            "exactly_once": sorted(ids) == sorted(ref), "tokens_identical": all(r["tokens"] == ref[r["request_id"]]
                                                                                 for r in results)})
    return out


if __name__ == "__main__":
    sys.exit(main())
