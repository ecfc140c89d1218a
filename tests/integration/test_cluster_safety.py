"""A cluster that is safe to share and survives its scheduler, on real local Ray instances (CPU).

One cluster (A) is started the way users start it, ``scalekv cluster start`` in its own state
directory, and serves the whole module (2 var-micro workers); a second one (B) comes up in its
own state directory for the isolation test. Every test leaves A's pools all-free (autouse).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.request import JOB_FIELDS  # noqa: E402
from scalekv.cli import main  # noqa: E402
from scheduler.client import ClusterClient, read_state  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
START = ["cluster", "start", "--model", "var-micro", "--random-init", "--threads", "1", "--dtype", "float32",
         "--block-size", "4", "--kv-pool-bytes", "4MiB", "--timeout", "120"]


def cli(state_dir: Path, *argv: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALEKV_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "scalekv", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), **kw)


def cli_bg(state_dir: Path, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, SCALEKV_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "scalekv", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        q = todo.pop()
        out.add(q)
        todo.extend(kids.get(q, []))
    return out


def listening(pids: set[int]) -> list[str]:
    """Local addresses of TCP listeners owned by these processes (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]


@pytest.fixture(scope="module")
def state_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("state-a")
    r = cli(d, *START, "--workers", "2", "--num-cpus", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    old = os.environ.get("SCALEKV_STATE_DIR")
    os.environ["SCALEKV_STATE_DIR"] = str(d)
    yield d
    if ray.is_initialized():
        ray.shutdown()
    r = cli(d, "cluster", "stop")
    if old is None:
        os.environ.pop("SCALEKV_STATE_DIR", None)
    else:
        os.environ["SCALEKV_STATE_DIR"] = old
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def cluster(state_a):
    return ClusterClient.connect()


@pytest.fixture(autouse=True)
def pools_all_free_after(request):
    yield
    if "cluster" not in request.fixturenames:
        return
    client = request.getfixturevalue("cluster")
    deadline = time.monotonic() + 60
    while True:
        stats = client.worker_stats()
        states = {w["name"]: w["state"] for w in client.status()["workers"]}
        ok = all(s.get("engine", {}).get("used") == 0 and s["engine"]["requests_reserved"] == 0
                 and s["engine"]["available_pages"] == s["engine"]["num_pages"] for s in stats.values())
        if ok and set(states.values()) == {"alive"}:
            return
        assert time.monotonic() < deadline, f"pools not all-free / workers not alive: {stats} {states}"
        time.sleep(0.3)


def _by_record(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results:
        out.setdefault(r["record"], []).append(r)
    return out


# ----- isolation --------------------------------------------------------------------------
def test_without_a_state_file_every_command_fails_at_once_naming_the_way_out(tmp_path):
    empty = tmp_path / "nothing"
    job = tmp_path / "j.jsonl"
    job.write_text('{"class_label": 1}\n')
    for argv in (["status"], ["jobs"], ["cluster", "stop"], ["submit", str(job), "--out", str(tmp_path / "o")],
                 ["wait", "abc", "--out", str(tmp_path / "o")], ["cancel", "abc"],
                 ["bench", "load", "--address", "state", "--model", "var-micro", "--random-init"]):
        t0 = time.monotonic()
        r = cli(empty, *argv, timeout=30)
        dt = time.monotonic() - t0
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert dt < 5, (argv, dt)
        assert "SCALEKV_STATE_DIR" in r.stderr and "--address" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr


def test_a_stale_state_file_is_reported_in_seconds_and_a_recycled_pid_is_never_signalled(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "cluster.json").write_text(json.dumps({
            "address": f"127.0.0.1:{port}", "namespace": "scalekv-gone", "name": "scalekv-scheduler",
            "keeper_pid": bystander.pid, "keeper_start": 1}))
        for argv in (["status"], ["cluster", "stop"], ["jobs"]):
            t0 = time.monotonic()
            r = cli(tmp_path, *argv, timeout=30)
            assert r.returncode == 2 and time.monotonic() - t0 < 5, (argv, r.stderr)
            assert "not running" in r.stderr and "--forget" in r.stderr, r.stderr
        assert bystander.poll() is None, "cluster stop signalled a process that is not the keeper"
        r = cli(tmp_path, "cluster", "stop", "--forget")
        assert r.returncode == 0 and not (tmp_path / "cluster.json").exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()


def test_a_local_cluster_listens_on_loopback_only(state_a):
    st = read_state()
    assert st["address"].startswith("127.0.0.1:") and st["namespace"].startswith("scalekv-")
    addrs = listening(descendants(st["keeper_pid"]))
    assert addrs, "no listening sockets found for the keeper's processes"
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in addrs), addrs


def test_two_clusters_from_two_state_dirs_never_touch_each_other(cluster, state_a, tmp_path):
    mine = cluster.submit([{"class_label": 1, "request_id": "only-in-a"}], job_id="job-in-a")
    list(cluster.stream(mine, timeout=60))
    state_b = tmp_path / "state-b"
    r = cli(state_b, *START, "--workers", "1", "--num-cpus", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    b = json.loads((state_b / "cluster.json").read_text())
    a = read_state()
    assert b["address"] != a["address"] and b["namespace"] != a["namespace"]
    try:
        job = tmp_path / "j.jsonl"
        job.write_text('{"class_label": 2, "request_id": "in-b"}\n')
        r = cli(state_b, "submit", str(job), "--out", str(tmp_path / "out-b"), "--job-id", "job-in-b")
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "job job-in-b", r.stdout + r.stderr
        jobs_b = json.loads(cli(state_b, "jobs", "--json").stdout)
        assert [j["job_id"] for j in jobs_b] == ["job-in-b"]
        assert "job-in-b" not in {j["job_id"] for j in cluster.jobs()}
        assert "job-in-a" in {j["job_id"] for j in cluster.jobs()}
    finally:
        r = cli(state_b, "cluster", "stop")
    assert r.returncode == 0, r.stderr
    assert not (state_b / "cluster.json").exists()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{b['keeper_pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{b['keeper_pid']}").exists()
    assert Path(f"/proc/{a['keeper_pid']}").exists(), "stopping B touched A's keeper"
    assert all(w["state"] == "alive" for w in cluster.status()["workers"])
    assert [r["ok"] for r in cluster.run([{"class_label": 3}], timeout=60)] == [True]


# ----- ids and input limits ---------------------------------------------------------------
@pytest.mark.parametrize("records, images, error_field", [
    ([{"class_label": 1, "request_id": "x"}, {"class_label": 2, "request_id": "x"}], ["x"], "request_id"),
    ([{"class_label": 99, "request_id": "x"}, {"class_label": 2, "request_id": "x"}], ["x"], "class_label"),
    ([{"class_label": 1, "request_id": "r1"}, {"class_label": 2}], ["r1"], "request_id"),
    ([{"class_label": 1, "num": 2, "request_id": "a"}, {"class_label": 99, "request_id": "a-1"}], ["a-0", "a-1"],
     "class_label"),
], ids=["duplicate", "invalid-named-like-a-later-valid", "default-id-clash", "bad-named-like-expanded"])
def test_each_duplicate_id_trigger_ends_with_the_images_and_one_clear_error(cluster, tmp_path, records, images,
                                                                             error_field):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert main(["submit", str(path), "--out", str(out), "--timeout", "60"]) == 1
    assert time.monotonic() - t0 < 60
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = sorted(r["request_id"] for r in recs if r["ok"])
    bad = [r for r in recs if not r["ok"]]
    assert ok == images and all((out / f"{i}.png").stat().st_size > 0 for i in images)
    assert len(bad) == 1 and bad[0]["fields"] == [error_field] and bad[0]["error"].startswith(error_field), bad
    assert len({r["request_id"] for r in recs}) == len(recs)


def test_deep_nesting_and_huge_records_are_record_errors_and_a_deep_file_is_a_file_error(cluster, tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join([json.dumps({"class_label": 1, "request_id": "fine"}),
                               '{"class_label": ' + "[" * 30000 + "]" * 30000 + "}",
                               '{"class_label": ' + "[" * 200000 + "]" * 200000 + "}",
                               json.dumps({"class_label": 1, "seed": [[[[[[[[[[1]]]]]]]]]]}),
                               json.dumps({"class_label": 1, "policy": "x" * 100000})]))
    out = tmp_path / "out"
    assert main(["submit", str(path), "--out", str(out), "--timeout", "60"]) == 1
    recs = {r["record"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert recs[0]["ok"] and len(recs) == 5
    for i in (1, 2, 3, 4):
        assert recs[i]["fields"] == ["record"] and len(recs[i]["error"]) < 300, recs[i]
    arr = tmp_path / "deep.json"
    arr.write_text("[" * 200000 + "]" * 200000)
    capsys.readouterr()
    assert main(["submit", str(arr), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


def test_sizing_a_job_with_hundreds_of_policy_budget_pairs_asks_no_worker(cluster):
    handles = list(cluster.worker_handles().values())
    ray.get([h.pause.remote() for h in handles])  # busy or paused workers must not slow the submit
    try:
        recs = [{"class_label": 1, "policy": f"nope-{i}"} for i in range(300)]
        recs += [{"class_label": 2, "policy": "sliding", "kv_budget": 0.05 + i / 100} for i in range(50)]
        t0 = time.monotonic()
        job = cluster.submit(recs)
        assert time.monotonic() - t0 < 10 and job["queued"] == 50 and job["rejected"] == 300
    finally:
        ray.get([h.resume.remote() for h in handles])
    results = list(cluster.stream(job, timeout=120))
    bad = [r for r in results if not r["ok"]]
    assert len(bad) == 300 and all(r["fields"] == ["policy"] and "unknown policy" in r["error"] for r in bad)
    assert sum(r["ok"] for r in results) == 50


VALUES = {
    "class_label": st.one_of(st.integers(-3, 12), st.sampled_from(["ring-striped", "nope", ""]), st.none(),
                             st.lists(st.integers(), max_size=2), st.booleans(), st.floats(allow_nan=True)),
    "num": st.one_of(st.integers(-1, 2), st.just(10**6), st.text(max_size=3)),
    "seed": st.one_of(st.integers(-2, 2**64), st.floats(), st.text(max_size=3)),
    "cfg": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 200), st.text(max_size=2)),
    "top_k": st.one_of(st.integers(-2, 2**21), st.floats(), st.none()),
    "top_p": st.one_of(st.floats(-1, 2), st.none(), st.text(max_size=2)),
    "policy": st.one_of(st.sampled_from(["full", "sliding", "h2o", "nope", "", "x" * 70]), st.none(), st.integers()),
    "kv_budget": st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")), st.none(), st.just(1e-9)),
    "request_id": st.one_of(st.text(alphabet="ab-1/.#", min_size=0, max_size=4), st.just("z" * 129), st.none(),
                            st.integers()),
    "bogus": st.integers(),
}
RECORD = st.one_of(
    st.fixed_dictionaries({"class_label": st.integers(0, 9)},
                          optional={k: v for k, v in VALUES.items() if k != "class_label"}),
    st.dictionaries(st.sampled_from(sorted(VALUES)), st.integers(0, 3), max_size=3),
    st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=3),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(records=st.lists(RECORD, min_size=1, max_size=5))
def test_fuzz_every_record_ends_as_its_images_or_one_error_naming_a_field(cluster, records):
    results = cluster.run(records, timeout=120)
    assert len({r["request_id"] for r in results}) == len(results), "ids unique in the results"
    grouped = _by_record(results)
    assert set(grouped) == set(range(len(records))), (records, results)
    for i, rs in grouped.items():
        names = set(JOB_FIELDS) | {"record"} | (set(map(str, records[i])) if isinstance(records[i], dict) else set())
        errors = [r for r in rs if not r["ok"]]
        if errors:
            assert len(rs) == 1, (records[i], rs)
            (e,) = errors
            assert e["fields"] and set(e["fields"]) <= names, (records[i], e)
            assert e["error"].split(":", 1)[0] in names and len(e["error"]) < 2000, e["error"]
        else:
            n = records[i].get("num", 1)
            assert len(rs) == n and all(r["png"] for r in rs), (records[i], rs)


# ----- durable jobs -----------------------------------------------------------------------
def _wait(pred, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def test_a_killed_scheduler_restarts_and_every_request_completes_once_with_identical_tokens(cluster, state_a,
                                                                                            tmp_path):
    recs = [{"class_label": i % 10, "num": 2, "seed": 700 + 2 * i, "cfg": 1.5, "top_k": 6, "top_p": 0.9,
             "request_id": f"k{i}"} for i in range(8)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    reference = {r["request_id"]: r["tokens"] for r in cluster.run(recs, timeout=120)}  # the no-fault run
    handles = cluster.worker_handles()
    ray.get([h.pause.remote() for h in handles.values()])
    before = cluster.status()["scheduler"]
    proc = cli_bg(state_a, "submit", str(path), "--out", str(tmp_path / "out"), "--job-id", "killed")
    _wait(lambda: cluster.status()["scheduler"]["in_flight"] >= 8, what="8+ requests in flight")
    ray.get(handles[sorted(handles)[0]].resume.remote())  # one worker finishes some results before the kill
    time.sleep(0.3)
    sched = ray.get_actor(cluster.name, namespace=cluster.namespace)
    t_kill = time.monotonic()
    ray.kill(sched, no_restart=False)
    ray.get([h.resume.remote() for h in handles.values()])
    st = _wait(lambda: _status_or_none(cluster), timeout=120, what="the restarted scheduler")
    recovery = time.monotonic() - t_kill
    assert st["scheduler"]["restarted"] and st["scheduler"]["uptime_s"] < before["uptime_s"]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert out.splitlines()[0] == "job killed"
    got = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["request_id"] for r in got) == sorted(reference), "every request exactly once"
    assert all(r["ok"] for r in got) and all(r["tokens"] == reference[r["request_id"]] for r in got)
    assert len(list((tmp_path / "out").glob("*.png"))) == 16
    s = _status_or_none(cluster)["scheduler"]
    assert s["restored"] + s["reclaimed"] >= 1 and s["reclaimed"] >= 1, s
    # `scalekv wait` re-attaches and collects the same results (idempotent)
    assert main(["wait", "killed", "--out", str(tmp_path / "again")]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "results.jsonl").read_text().splitlines()]
    assert {r["request_id"]: r["tokens"] for r in again} == reference
    print(f"\nscheduler recovery after kill: {recovery:.2f}s")


def _status_or_none(client):
    try:
        return client.status()
    except Exception:
        return None


def test_cancel_frees_the_queue_and_every_page_of_running_requests(cluster):
    handles = list(cluster.worker_handles().values())
    ray.get([h.pause.remote() for h in handles])
    job = cluster.submit([{"class_label": 1, "num": 1000, "seed": 5}], job_id="to-cancel")
    deadline = time.monotonic() + 60
    while True:  # let the workers step briefly, then freeze them while requests run (holding pages)
        ray.get([h.resume.remote() for h in handles])
        time.sleep(0.02)
        ray.get([h.pause.remote() for h in handles])
        held = sum(s["engine"]["reserved_pages"] for s in cluster.worker_stats().values())
        if held > 0:
            break
        assert time.monotonic() < deadline, "no request ever held pages"
    try:
        got = cluster.cancel("to-cancel")
        after = cluster.worker_stats()
    finally:
        ray.get([h.resume.remote() for h in handles])
    assert got["queued_removed"] > 0 and got["running_cancelled"] > 0 and got["pages_freed"] == held, (got, held)
    for s in after.values():  # returned at once, not when the requests would have finished
        e = s["engine"]
        assert e["reserved_pages"] == 0 and e["used"] == 0 and e["available_pages"] == e["num_pages"], e
    results = list(cluster.stream(job, timeout=60))
    assert sorted(r["request_id"] for r in results) == sorted(f"r0-{i}" for i in range(1000))
    cancelled = [r for r in results if not r["ok"]]
    assert len(cancelled) == got["queued_removed"] + got["running_cancelled"]
    assert all("cancelled" in r["error"] for r in cancelled)
    st = cluster.job_status("to-cancel")
    assert st["state"] == "cancelled" and st["cancel"]["pages_freed"] == held and st["done"]


def test_a_scheduler_gone_for_good_is_reported_and_cluster_start_resumes_the_stored_jobs(cluster, state_a, tmp_path):
    handles = cluster.worker_handles()
    ray.get([h.pause.remote() for h in handles.values()])
    job = cluster.submit([{"class_label": 4, "num": 3, "seed": 9}], job_id="orphan")
    _wait(lambda: cluster.job_status("orphan")["in_flight"] == 3, what="in flight")
    ray.kill(ray.get_actor(cluster.name, namespace=cluster.namespace), no_restart=True)
    _wait(lambda: _gone(cluster), what="the scheduler to be gone")
    r = cli(state_a, "status")
    assert r.returncode == 2 and "cluster start" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(state_a, *START, "--workers", "2", "--num-cpus", "2")
    assert r.returncode == 0 and "resumed 3 stored request(s)" in r.stdout, r.stdout + r.stderr
    assert read_state()["keeper_pid"], "the recovery kept the keeper in the state file"
    cluster.scheduler = ray.get_actor(cluster.name, namespace=cluster.namespace)
    results = list(cluster.stream(job, timeout=120))
    assert sorted(r["request_id"] for r in results) == ["r0-0", "r0-1", "r0-2"] and all(r["ok"] for r in results)


def _gone(client) -> bool:
    try:
        ray.get_actor(client.name, namespace=client.namespace)
    except ValueError:
        return True
    return False


def test_sigint_leaves_the_job_running(cluster, state_a, tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"class_label": 2, "num": 12, "seed": 1}))
    handles = cluster.worker_handles()
    ray.get([h.pause.remote() for h in handles.values()])
    proc = cli_bg(state_a, "submit", str(path), "--out", str(tmp_path / "o"), "--job-id", "interrupted")
    lines: list[str] = []  # stderr, read as it comes: the signal must land after the cluster took the job

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        _wait(lambda: any("queued" in line for line in lines), timeout=120, what="the job queued")
        assert "interrupted" in {j["job_id"] for j in cluster.jobs()}
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=30)
        err = "".join(lines)
    finally:
        ray.get([h.resume.remote() for h in handles.values()])
    assert proc.returncode == 130 and "scalekv wait interrupted" in err, err
    assert main(["wait", "interrupted", "--out", str(tmp_path / "w")]) == 0
    assert len(list((tmp_path / "w").glob("*.png"))) == 12
