"""Job file parsing and validation (no Ray): every malformed record gets an error naming the field."""

from __future__ import annotations

import json

import msgpack
import pytest

from scheduler.wire import (
    JobFileError,
    decode_job,
    encode_job_msgpack,
    iter_results_msgpack,
    parse_job,
    parse_records,
    result_summary,
    write_results_msgpack,
)


def _jsonl(*records) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def test_num_expands_with_consecutive_seeds_and_suffixed_ids():
    job = parse_job(_jsonl({"class_label": 3, "num": 3, "seed": 10, "request_id": "cats", "cfg": 2, "top_k": 5},
                           {"class_label": 1}), "jsonl", num_classes=10)
    assert not job.errors
    assert [(r.request_id, r.seed, r.class_label) for r in job.requests] == [
        ("cats-0", 10, 3), ("cats-1", 11, 3), ("cats-2", 12, 3), ("r1", 0, 1)]
    assert job.requests[0].cfg == 2.0 and isinstance(job.requests[0].cfg, float) and job.requests[0].top_k == 5
    assert job.requests[3].policy is None and job.requests[3].kv_budget is None and job.total == 4


@pytest.mark.parametrize("record, field, words", [
    ({"class_label": 99}, "class_label", "unknown class 99"),
    ({"class_label": "3"}, "class_label", "must be an integer"),
    ({"class_label": True}, "class_label", "must be an integer"),
    ({"seed": 1}, "class_label", "missing"),
    ({"class_label": 1, "cfg": float("nan")}, "cfg", "finite"),
    ({"class_label": 1, "cfg": -1}, "cfg", ">= 0"),
    ({"class_label": 1, "kv_budget": 1.5}, "kv_budget", "(0, 1]"),
    ({"class_label": 1, "kv_budget": 0}, "kv_budget", "(0, 1]"),
    ({"class_label": 1, "seed": "abc"}, "seed", "must be an integer"),
    ({"class_label": 1, "seed": 1.5}, "seed", "must be an integer"),
    ({"class_label": 1, "seed": -1}, "seed", "[0, 2^63)"),
    ({"class_label": 1, "top_k": -1}, "top_k", ">= 0"),
    ({"class_label": 1, "top_p": 2}, "top_p", "[0, 1]"),
    ({"class_label": 1, "policy": ""}, "policy", "non-empty string"),
    ({"class_label": 1, "policy": 7}, "policy", "non-empty string"),
    ({"class_label": 1, "num": 0}, "num", "[1, 10000]"),
    ({"class_label": 1, "num": 2.0}, "num", "[1, 10000]"),
    ({"class_label": 1, "request_id": "a/b"}, "request_id", "PNG file"),
    ({"class_label": 1, "clas": 2}, "clas", "unknown field"),
])
def test_each_malformed_record_gets_an_error_naming_the_field(record, field, words):
    job = parse_records([record, {"class_label": 2, "request_id": "good"}], num_classes=10)
    assert [r.request_id for r in job.requests] == ["good"]
    (err,) = job.errors
    assert err.field == field and words in err.reason and err.message.startswith(f"{field}: ")
    assert err.record == 0


def test_nan_from_a_json_file_and_bad_lines_are_record_errors_not_file_errors():
    data = _jsonl({"class_label": 1, "request_id": "ok"}, '{"class_label": 1, "cfg": NaN}', "{not json",
                  "[1, 2]", "", {"class_label": 2})
    job = parse_job(data, "jsonl", num_classes=10)
    assert [r.request_id for r in job.requests] == ["ok", "r4"]
    errs = {e.request_id: e for e in job.errors}
    assert errs["r1"].field == "cfg"
    assert errs["r2"].field == "record" and "invalid JSON" in errs["r2"].reason and "line 3" in errs["r2"].message
    assert errs["r3"].field == "record" and "map" in errs["r3"].reason


def test_duplicate_request_ids_are_rejected():
    job = parse_records([{"class_label": 1, "request_id": "a", "num": 2}, {"class_label": 1, "request_id": "a-1"},
                         {"class_label": 1, "request_id": "b"}, {"class_label": 2, "request_id": "b"}])
    assert [r.request_id for r in job.requests] == ["a-0", "a-1", "b"]
    assert [(e.record, e.field) for e in job.errors] == [(1, "request_id"), (3, "request_id")]
    assert "duplicate" in job.errors[0].reason


def test_msgpack_stream_and_array_forms():
    recs = [{"class_label": 1, "num": 2}, {"class_label": 4, "seed": 7, "request_id": "x"}]
    for data in (encode_job_msgpack(recs), msgpack.packb(recs)):
        job = parse_job(data, name="jobs.msgpack", num_classes=10)
        assert [(r.request_id, r.seed) for r in job.requests] == [("r0-0", 0), ("r0-1", 1), ("x", 7)]


@pytest.mark.parametrize("mangle, words", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b[:5] + b"\xc1" + b[5:], "corrupt msgpack"),
    (lambda b: bytes(range(0, 40)), "not a msgpack job file"),
    (lambda b: b"", "no records"),
])
def test_corrupt_msgpack_is_a_clear_file_error(mangle, words):
    data = encode_job_msgpack([{"class_label": 1, "num": 2}, {"class_label": 2, "request_id": "tail"}])
    with pytest.raises(JobFileError, match="jobs.msgpack") as e:
        decode_job(mangle(data), name="jobs.msgpack")
    assert words in str(e.value)


def test_format_detection_and_non_utf8_jsonl():
    assert parse_job(_jsonl({"class_label": 1}), name="jobs.dat").requests  # sniffed as JSON
    assert parse_job(encode_job_msgpack([{"class_label": 1}]), name="jobs.dat").requests
    with pytest.raises(JobFileError, match="UTF-8"):
        decode_job(b"\xff\xfe{}", "jsonl", "x.jsonl")
    with pytest.raises(JobFileError, match="unknown job format"):
        decode_job(b"{}", "yaml")


def test_results_msgpack_roundtrip(tmp_path):
    results = [{"request_id": "a", "ok": True, "png": b"\x89PNG..", "tokens": [1, 2], "stats": {"s": 0.5}},
               {"request_id": "b", "ok": False, "error": "cfg: bad", "png": None}]
    path = tmp_path / "results.msgpack"
    assert write_results_msgpack(results, path) == 2
    assert list(iter_results_msgpack(path)) == results
    assert "png" not in result_summary(results[0]) and result_summary(results[1])["png"] is None
