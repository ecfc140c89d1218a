"""``scalekv bench load``: arrival processes (statistical checks, fixed seeds), the client-side
concurrency limit, and a tiny end-to-end load on var-micro whose JSON has every field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.arrivals import arrival_times, gap_stats, make_stream, with_rate
from benchmarks.load import (
    RATIO_FIELDS,
    REPORT_FIELDS,
    REQUEST_FIELDS,
    RUN_FIELDS,
    STAT_FIELDS,
    SUMMARY_FIELDS,
    TIMELINE_FIELDS,
    PolicySpec,
    _Sender,
    parse_policy,
)

N = 20_000  # gaps per statistical check: the standard error of the mean gap is ~0.7% (Poisson)


# --------------------------------------------------------------------------- arrivals
def test_poisson_gaps_have_mean_one_over_rate_and_exponential_shape():
    rate = 5.0
    t = arrival_times(N, rate, burstiness=1.0, seed=1)
    assert np.all(np.diff(t) >= 0) and t[0] > 0
    s = gap_stats(t)
    assert s["mean_gap_s"] == pytest.approx(1 / rate, rel=0.03)
    assert s["cv"] == pytest.approx(1.0, abs=0.05)
    gaps = np.diff(np.concatenate([[0.0], t]))
    for x in (0.1, 0.2, 0.5):  # P(gap <= x) = 1 - exp(-R x)
        assert np.mean(gaps <= x) == pytest.approx(1 - math.exp(-rate * x), abs=0.015)


@pytest.mark.parametrize("burstiness, cv", [(0.25, 2.0), (0.5, math.sqrt(2)), (4.0, 0.5), (math.inf, 0.0)])
def test_gamma_burstiness_sets_the_coefficient_of_variation_and_keeps_the_rate(burstiness, cv):
    rate = 2.0
    s = gap_stats(arrival_times(N, rate, burstiness=burstiness, seed=2))
    assert s["mean_gap_s"] == pytest.approx(1 / rate, rel=0.05)
    assert s["cv"] == pytest.approx(cv, rel=0.08, abs=1e-9)


def test_burstier_means_larger_cv_with_the_same_seed():
    cvs = [gap_stats(arrival_times(5000, 1.0, b, seed=3))["cv"] for b in (0.2, 0.5, 1.0, 2.0, 8.0)]
    assert cvs == sorted(cvs, reverse=True)


def test_streams_are_deterministic_and_classes_do_not_depend_on_the_process():
    a = make_stream(64, 10, request_rate=3.0, burstiness=0.5, seed=7)
    assert a == make_stream(64, 10, request_rate=3.0, burstiness=0.5, seed=7)
    b = make_stream(64, 10, request_rate=3.0, burstiness=0.5, seed=8)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    assert [r.class_label for r in a] != [r.class_label for r in b]
    assert not {r.seed for r in a} & {r.seed for r in b}  # other stream seed, other images
    c = make_stream(64, 10, request_rate=9.0, burstiness=2.0, seed=7)
    assert [(r.class_label, r.seed, r.request_id) for r in a] == [(r.class_label, r.seed, r.request_id) for r in c]
    assert {r.class_label for r in a} <= set(range(10)) and len({r.class_label for r in a}) > 5
    # a sweep rescales one gap sequence: same stream, arrivals scaled by the rate ratio
    d = with_rate(a, 6.0, 0.5, seed=7)
    assert [r.class_label for r in d] == [r.class_label for r in a]
    assert np.allclose([2 * r.arrival_s for r in d], [r.arrival_s for r in a])


def test_infinite_rate_and_normalized_durations():
    assert np.all(arrival_times(10, math.inf, 1.0, seed=0) == 0)
    t = arrival_times(50, 4.0, 0.3, seed=5, normalize=True)
    assert t[-1] == pytest.approx(50 / 4.0)
    with pytest.raises(ValueError, match="request_rate"):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(3, 1.0, burstiness=0)


def test_sender_respects_arrivals_and_the_concurrency_limit():
    stream = make_stream(5, 3, request_rate=math.inf)
    s = _Sender(stream, max_concurrency=2)
    first = s.due(0.0)
    assert [r.request_id for r, _ in first] == ["q0", "q1"] and s.due(0.5) == []
    s.done(1.0)
    ((r, sent),) = s.due(1.5)  # the slot freed at 1.0: sent then, not when the loop looked
    assert r.request_id == "q2" and sent == 1.0
    late = make_stream(3, 3, request_rate=1.0, seed=4)
    s = _Sender(late, None)
    assert s.due(late[0].arrival_s - 1e-9) == []
    assert [sent for _, sent in s.due(late[-1].arrival_s)] == [r.arrival_s for r in late]


def test_policy_specs():
    assert parse_policy("scalekv@0.1", 0.5) == PolicySpec("scalekv", 0.1)
    assert parse_policy("sliding", 0.25) == PolicySpec("sliding", 0.25)
    assert parse_policy("full", 0.1) == PolicySpec("full", 1.0) and PolicySpec("full", 1.0).label == "full"
    assert PolicySpec("sliding", 0.25).label == "sliding@0.25"
    for bad, word in (("nope", "unknown policy"), ("sliding@x", "budget"), ("sliding@1.5", "kv_budget")):
        with pytest.raises(ValueError, match=word):
            parse_policy(bad, 0.1)


# --------------------------------------------------------------------------- end to end
def test_tiny_load_end_to_end_two_policies_json_has_every_field(tmp_path, capsys):
    from scalekv.cli import main

    out, plots = tmp_path / "load.json", tmp_path / "plots"
    rc = main(["bench", "load", "--model", "var-micro", "--random-init", "--num-requests", "5",
               "--request-rates", "200,inf", "--max-concurrency", "2", "--policy", "full", "--policy", "sliding",
               "--kv-budget", "0.5", "--kv-pool-bytes", "1MiB", "--dtype", "float32", "--seed", "3",
               "--report", str(out), "--plot", str(plots), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "sliding@0.5" in table and "ratios to full" in table
    rep = json.loads(out.read_text())
    assert set(REPORT_FIELDS) <= set(rep)
    assert rep["model"] == "var-micro" and rep["mode"] == "local-engine" and rep["baseline"] == "full"
    assert [(r["label"], r["request_rate"]) for r in rep["runs"]] == [
        ("full", 200.0), ("sliding@0.5", 200.0), ("full", "inf"), ("sliding@0.5", "inf")]
    streams = set()
    for run in rep["runs"]:
        assert set(RUN_FIELDS) <= set(run)
        s = run["summary"]
        assert set(SUMMARY_FIELDS) <= set(s), set(SUMMARY_FIELDS) - set(s)
        for key in ("e2e_s", "ttfs_s", "queue_s"):
            assert set(STAT_FIELDS) <= set(s[key]) and all(v is not None and v >= 0 for v in s[key].values())
        assert s["completed"] == 5 and s["errors"] == 0 and s["images_per_s"] > 0
        assert s["ttfs_s"]["p50"] < s["e2e_s"]["p50"] and s["e2e_s"]["p50"] <= s["e2e_s"]["p90"] <= s["e2e_s"]["p99"]
        assert 1 <= s["running_peak"] <= 2 and s["in_system_peak"] <= 2 and 0 < s["running_mean"] <= 2
        assert 0 < s["kv_peak_bytes"] == s["kv_peak_pages"] * rep["pool"]["page_bytes"]
        assert 0 < s["pool_usage_peak"] <= 1 and s["pages_in_use_after"] == 0 and s["preemptions"] == 0
        assert len(run["requests"]) == 5 and all(set(REQUEST_FIELDS) <= set(q) for q in run["requests"])
        for q in run["requests"]:
            assert q["ok"] and q["sent_s"] >= q["arrival_s"] and q["e2e_s"] > q["ttfs_s"] > 0
        tl = run["timeline"]
        assert set(TIMELINE_FIELDS) <= set(tl) and len({len(v) for v in tl.values()}) == 1 and s["steps"] > 0
        assert max(tl["used_pages"]) <= s["kv_peak_pages"] and tl["t_s"] == sorted(tl["t_s"])
        streams.add(tuple((q["request_id"], q["class_label"], q["seed"], q["arrival_s"]) for q in run["requests"]))
    assert len(streams) == 2  # one stream per rate, identical for both policies
    by = {(r["label"], r["request_rate"]): r["summary"] for r in rep["runs"]}
    for rate in (200.0, "inf"):  # half the budget: a smaller pool peak than full on the same stream
        assert by[("sliding@0.5", rate)]["kv_peak_bytes"] < by[("full", rate)]["kv_peak_bytes"]
    assert len(rep["ratios"]) == 2 and all(set(RATIO_FIELDS) <= set(q) for q in rep["ratios"])
    assert rep["ratios"][0]["kv_peak_bytes"] < 1
    assert [q["request_id"] for q in rep["workload"]["requests"]] == [f"q{i}" for i in range(5)]
    for name in ("pool_usage.png", "latency_cdf.png", "throughput_vs_rate.png"):
        assert (plots / name).stat().st_size > 1000


def test_a_policy_the_engine_refuses_fails_its_requests_not_the_benchmark(tmp_path, capsys):
    from scalekv.cli import main

    out = tmp_path / "load.json"
    rc = main(["bench", "load", "--model", "var-micro", "--random-init", "--num-requests", "2",
               "--policy", "full", "--policy", "scalekv@0.5", "--profile-path", str(tmp_path / "missing.json"),
               "--kv-pool-bytes", "1MiB", "--dtype", "float32", "--report", str(out), "--no-progress"])
    assert rc == 1
    rep = json.loads(out.read_text())
    full, sk = (r["summary"] for r in rep["runs"])
    assert full["completed"] == 2 and sk["completed"] == 0 and sk["errors"] == 2
    assert "scale profile" in sk["error_messages"][0]
    assert rep["ratios"][0]["images_per_s"] == 0
    assert "error (scalekv@0.5)" in capsys.readouterr().out


def test_tiny_load_on_a_local_cluster(tmp_path):
    pytest.importorskip("ray")
    from scalekv.cli import main

    out = tmp_path / "load.json"
    rc = main(["bench", "load", "--model", "var-micro", "--random-init", "--cluster-workers", "1", "--threads", "1",
               "--num-requests", "4", "--request-rate", "50", "--policy", "full", "--policy", "sliding@0.5",
               "--kv-pool-bytes", "1MiB", "--dtype", "float32", "--report", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["mode"] == "local-cluster" and set(REPORT_FIELDS) <= set(rep)
    for run in rep["runs"]:
        s = run["summary"]
        assert set(SUMMARY_FIELDS) <= set(s)
        assert (s["completed"], s["errors"]) == (4, 0), s.get("error_messages")
        assert s["kv_peak_source"] == "pool high-water mark" and s["kv_peak_bytes"] > 0  # a fresh pool per run
        assert s["pages_in_use_after"] == 0 and all(q["e2e_s"] > q["ttfs_s"] > 0 for q in run["requests"])
    assert rep["ratios"][0]["kv_peak_bytes"] < 1
