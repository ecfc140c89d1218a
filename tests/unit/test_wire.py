"""Job files and the one validator (no Ray): every malformed record ends as one error naming
every bad field, ids stay unique, and nothing else in the job is lost."""

from __future__ import annotations

import json

import msgpack
import pytest
from pydantic import ValidationError

from engine.request import ImageRequest, ImageResult, validate_records
from scheduler.wire import (
    JobFileError,
    decode_job,
    encode_job_msgpack,
    iter_results_msgpack,
    result_summary,
    validate_job,
    write_results_msgpack,
)

NAMES = [f"c{i}" for i in range(10)]


def parse_job(data: bytes, fmt: str | None = None, name: str = "<job>", num_classes: int | None = None):
    return validate_job(decode_job(data, fmt, name), num_classes=num_classes)


def parse_records(records, num_classes: int | None = None):
    return validate_records(records, num_classes=num_classes)


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
    assert job.record_of == {"cats-0": 0, "cats-1": 0, "cats-2": 0, "r1": 1}


@pytest.mark.parametrize("record, field, words", [
    ({"class_label": 99}, "class_label", "unknown class 99"),
    ({"class_label": "c3x"}, "class_label", "unknown class 'c3x'"),
    ({"class_label": True}, "class_label", "class index or name"),
    ({"class_label": 2.0}, "class_label", "class index or name"),
    ({"seed": 1}, "class_label", "missing"),
    ({"class_label": 1, "cfg": float("nan")}, "cfg", "finite"),
    ({"class_label": 1, "cfg": -1}, "cfg", "greater than or equal to 0"),
    ({"class_label": 1, "cfg": 1e308}, "cfg", "less than or equal to 100"),
    ({"class_label": 1, "kv_budget": 1.5}, "kv_budget", "less than or equal to 1"),
    ({"class_label": 1, "kv_budget": 0}, "kv_budget", "greater than 0"),
    ({"class_label": 1, "seed": "abc"}, "seed", "valid integer"),
    ({"class_label": 1, "seed": 1.5}, "seed", "valid integer"),
    ({"class_label": 1, "seed": -1}, "seed", "greater than or equal to 0"),
    ({"class_label": 1, "seed": 2**63 - 1, "num": 2}, "seed", "[0, 2^63)"),
    ({"class_label": 1, "top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"class_label": 1, "top_p": 2}, "top_p", "less than or equal to 1"),
    ({"class_label": 1, "policy": ""}, "policy", "at least 1 character"),
    ({"class_label": 1, "policy": 7}, "policy", "valid string"),
    ({"class_label": 1, "num": 0}, "num", "greater than or equal to 1"),
    ({"class_label": 1, "num": 2.0}, "num", "valid integer"),
    ({"class_label": 1, "request_id": "a/b"}, "request_id", "match pattern"),
    ({"class_label": 1, "clas": 2}, "clas", "unknown field"),
    ({"class_label": 1, "job_id": "x"}, "job_id", "unknown field"),
])
def test_each_malformed_record_gets_an_error_naming_the_field(record, field, words):
    job = validate_records([record, {"class_label": 2, "request_id": "good"}], class_names=NAMES)
    assert [r.request_id for r in job.requests] == ["good"]
    (err,) = job.errors
    assert err.fields == [field] and words in err.message and err.message.startswith(f"{field}: ")
    assert err.record == 0


def test_every_bad_field_of_a_record_is_reported_once():
    job = validate_records([{"class_label": 42, "cfg": "x", "top_p": 3, "nope": 1}], num_classes=10)
    (err,) = job.errors
    assert sorted(err.fields) == ["cfg", "class_label", "nope", "top_p"]
    assert len(err.message.split("; ")) == 4


def test_class_names_are_accepted_and_resolved_to_indices():
    job = validate_records([{"class_label": "c7", "request_id": "named"}, {"class_label": 7}], class_names=NAMES)
    assert [r.class_label for r in job.requests] == [7, 7]


def test_a_huge_bad_value_is_quoted_short():
    job = validate_records([{"class_label": 1, "request_id": "x" * 5_000_000}], num_classes=10)
    (err,) = job.errors
    assert err.fields == ["request_id"] and len(err.message) < 600 and err.request_id == "r0"


def test_nan_from_a_json_file_and_bad_lines_are_record_errors_not_file_errors():
    data = _jsonl({"class_label": 1, "request_id": "ok"}, '{"class_label": 1, "cfg": NaN}', "{not json",
                  "[1, 2]", "", {"class_label": 2})
    job = parse_job(data, "jsonl", num_classes=10)
    assert [r.request_id for r in job.requests] == ["ok", "r4"]
    errs = {e.record: e for e in job.errors}
    assert errs[1].fields == ["cfg"]
    assert errs[2].fields == ["record"] and "invalid JSON" in errs[2].message and "line 3" in errs[2].message
    assert errs[3].fields == ["record"] and "map" in errs[3].message


@pytest.mark.parametrize("records, images, error_record", [
    # a plain duplicate: the first valid record wins
    ([{"class_label": 1, "request_id": "b"}, {"class_label": 2, "request_id": "b"}], ["b"], 1),
    # an invalid record whose id equals a later valid one: the valid one keeps its id
    ([{"class_label": 99, "request_id": "b"}, {"class_label": 2, "request_id": "b"}], ["b"], 0),
    # a default id rN clashing with an explicit one
    ([{"class_label": 1, "request_id": "r1"}, {"class_label": 2}], ["r1"], 1),
    # a bad record named like an expanded id-i
    ([{"class_label": 1, "request_id": "a", "num": 2}, {"class_label": 1, "cfg": -1, "request_id": "a-1"}],
     ["a-0", "a-1"], 1),
])
def test_duplicate_id_triggers_end_as_images_and_one_clear_error(records, images, error_record):
    job = validate_records(records, num_classes=10)
    assert [r.request_id for r in job.requests] == images
    (err,) = job.errors
    assert err.record == error_record
    ids = [r.request_id for r in job.requests] + [err.request_id]
    assert len(set(ids)) == len(ids)  # no error result can shadow an image


def test_python_api_request_is_validated_at_construction():
    with pytest.raises(ValidationError):
        ImageRequest(class_label=1, kv_budget=0)
    assert ImageRequest(class_label="ring-striped").class_label == "ring-striped"  # resolved by the engine


def test_one_result_schema_for_images_and_errors():
    ok = ImageResult("a", 1, 2, tokens=[1], png=b"x").to_record(png="a.png")
    bad = validate_records([{"class_label": -1}], num_classes=10).errors[0].result("j").to_record()
    assert set(ok) == set(bad)
    assert bad["ok"] is False and bad["fields"] == ["class_label"] and bad["job_id"] == "j"


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
