"""Job and result wire formats: what crosses from users to the cluster and back.

A **job file** holds one record per line (JSONL) or one msgpack map per record (a stream of
maps, or a single array of maps). A record asks for ``num`` images:

    {"class_label": 3, "num": 4, "seed": 10, "cfg": 1.5, "top_k": 100, "top_p": 0.95,
     "policy": "full", "kv_budget": 1.0, "request_id": "cats"}

Only ``class_label`` is required. ``num`` (default 1) expands the record into ``num``
requests with seeds ``seed, seed+1, ...`` (``seed`` defaults to 0). Request ids: the record's
``request_id`` (default ``r<record index>``, 0-based over the file), suffixed ``-<i>`` for
image i when ``num > 1`` ("cats-0" ... "cats-3"); with ``num == 1`` the id is used as is.
Ids must be unique within a job and filename-safe, because ``scalekv submit`` names each PNG
after its request id.

Why this much checking here: a job is often thousands of requests typed by hand or generated
by scripts, and one typo must cost one error result that names the field and the reason, not
the whole job or the cluster. A file that cannot be framed at all (corrupt or truncated
msgpack) has no trustworthy records, so it is refused as a whole with ``JobFileError``.

**Results** are plain dicts (see ``result_record``); ``write_results_msgpack`` stores them as a
msgpack stream with the PNG bytes inline, ``scalekv submit`` writes PNG files plus
``results.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack

JOB_FIELDS = ("class_label", "num", "seed", "cfg", "top_k", "top_p", "policy", "kv_budget", "request_id")
MAX_NUM = 10_000  # per record: a typo like num=1e6 should be an error, not a day of compute
MAX_SEED = 2**63
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MSGPACK_SUFFIXES = (".msgpack", ".mpk", ".msgpk", ".mp")


class JobFileError(ValueError):
    """The job file as a whole cannot be read (corrupt or truncated msgpack, no records ...)."""


@dataclass(frozen=True)
class RawRecord:
    """One decoded record before validation. ``error`` is set when the record itself could
    not be decoded (a JSONL line that is not JSON); ``where`` says where it came from."""

    index: int
    value: Any = None
    error: str | None = None
    where: str = ""


@dataclass(frozen=True)
class WireRequest:
    """One validated image request, as sent to a worker (plain fields only, no tensors)."""

    request_id: str
    class_label: int
    seed: int
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    policy: str | None = None
    kv_budget: float | None = None
    record: int = 0  # index of the record in the job it came from

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WireRequest:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class RecordError:
    """A malformed record: which record, which field, why."""

    request_id: str
    record: int
    field: str
    reason: str
    where: str = ""

    @property
    def message(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return f"{self.field}: {self.reason}{at}"


@dataclass
class ParsedJob:
    """A job after validation: the requests to run and the records already answered with an error."""

    requests: list[WireRequest]
    errors: list[RecordError]

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.errors)


class _FieldError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# ----- decoding ---------------------------------------------------------------------------
def detect_format(name: str, data: bytes) -> str:
    """'jsonl' or 'msgpack', by suffix, else by sniffing the first byte (JSON starts with '{')."""
    suffix = Path(name).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in MSGPACK_SUFFIXES:
        return "msgpack"
    head = data.lstrip()[:1]
    return "jsonl" if head in (b"{", b"[") else "msgpack"


def decode_job(data: bytes, fmt: str | None = None, name: str = "<job>") -> list[RawRecord]:
    """Bytes of a job file -> raw records. Raises JobFileError when the file as a whole is unreadable."""
    if not isinstance(data, (bytes, bytearray)):
        raise JobFileError(f"{name}: expected bytes, got {type(data).__name__}")
    fmt = fmt or detect_format(name, data)
    if fmt == "jsonl":
        records = _decode_jsonl(bytes(data), name)
    elif fmt == "msgpack":
        records = _decode_msgpack(bytes(data), name)
    else:
        raise JobFileError(f"{name}: unknown job format {fmt!r} (expected 'jsonl' or 'msgpack')")
    if not records:
        raise JobFileError(f"{name}: the job file holds no records")
    return records


def read_job_file(path: str | Path, fmt: str | None = None) -> list[RawRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file not found: {path}")
    return decode_job(path.read_bytes(), fmt, str(path))


def _decode_jsonl(data: bytes, name: str) -> list[RawRecord]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(f"{name}: not UTF-8 text at byte {e.start}, so not a JSONL job file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a single JSON array of records is accepted too
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobFileError(f"{name}: corrupt JSON array at line {e.lineno} column {e.colno}: {e.msg}") from None
        return [RawRecord(i, v, where=f"{name} record {i}") for i, v in enumerate(arr)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            records.append(RawRecord(len(records), json.loads(line), where=where))
        except json.JSONDecodeError as e:
            records.append(RawRecord(len(records), None, error=f"invalid JSON at column {e.colno}: {e.msg}",
                                     where=where))
    return records


def _decode_msgpack(data: bytes, name: str) -> list[RawRecord]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    objs: list[Any] = []
    try:
        for obj in unpacker:
            objs.append(obj)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
            msgpack.exceptions.BufferFull, ValueError) as e:  # UnpackValueError and UnicodeDecodeError are ValueErrors
        raise JobFileError(f"{name}: corrupt msgpack at byte {unpacker.tell()} (after {len(objs)} record(s)): "
                           f"{type(e).__name__}: {e}") from None
    if unpacker.tell() != len(data):
        raise JobFileError(f"{name}: corrupt msgpack: truncated record at byte {unpacker.tell()} of {len(data)} "
                           f"(after {len(objs)} record(s))")
    if len(objs) == 1 and isinstance(objs[0], list):
        objs = objs[0]
    if objs and not any(isinstance(o, dict) for o in objs):
        kinds = ", ".join(sorted({type(o).__name__ for o in objs}))
        raise JobFileError(f"{name}: not a msgpack job file: expected maps (one per record), found only {kinds}")
    return [RawRecord(i, v, where=f"{name} record {i}") for i, v in enumerate(objs)]


# ----- validation -------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_record(rec: dict, num_classes: int | None) -> dict:
    """Validate one record's fields; returns the normalised values. Raises _FieldError."""
    for key in rec:
        if key not in JOB_FIELDS:
            raise _FieldError(str(key), f"unknown field (known fields: {', '.join(JOB_FIELDS)})")
    if "class_label" not in rec:
        raise _FieldError("class_label", "missing (required)")
    cl = rec["class_label"]
    if not _is_int(cl):
        raise _FieldError("class_label", f"must be an integer, got {type(cl).__name__} {cl!r}")
    if cl < 0 or (num_classes is not None and cl >= num_classes):
        hint = f"the model has classes 0..{num_classes - 1}" if num_classes is not None else "must be >= 0"
        raise _FieldError("class_label", f"unknown class {cl} ({hint})")
    num = rec.get("num", 1)
    if not _is_int(num) or not 1 <= num <= MAX_NUM:
        raise _FieldError("num", f"must be an integer in [1, {MAX_NUM}], got {num!r}")
    seed = rec.get("seed", 0)
    if not _is_int(seed):
        raise _FieldError("seed", f"must be an integer, got {type(seed).__name__} {seed!r}")
    if seed < 0 or seed + num > MAX_SEED:
        raise _FieldError("seed", f"seed..seed+num-1 must lie in [0, 2^63), got seed {seed} with num {num}")
    out = {"class_label": cl, "num": num, "seed": seed}
    cfg = rec.get("cfg")
    if cfg is not None and (not _is_number(cfg) or not math.isfinite(cfg) or cfg < 0):
        raise _FieldError("cfg", f"must be a finite number >= 0, got {cfg!r}")
    out["cfg"] = None if cfg is None else float(cfg)
    top_k = rec.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _FieldError("top_k", f"must be an integer >= 0 (0 disables), got {top_k!r}")
    out["top_k"] = top_k
    top_p = rec.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not math.isfinite(top_p) or not 0 <= top_p <= 1):
        raise _FieldError("top_p", f"must be a number in [0, 1] (0 disables), got {top_p!r}")
    out["top_p"] = None if top_p is None else float(top_p)
    policy = rec.get("policy")
    if policy is not None and (not isinstance(policy, str) or not policy):
        raise _FieldError("policy", f"must be a non-empty string naming a KV policy, got {policy!r}")
    out["policy"] = policy
    budget = rec.get("kv_budget")
    if budget is not None and (not _is_number(budget) or not math.isfinite(budget) or not 0 < budget <= 1):
        raise _FieldError("kv_budget", f"must be a fraction in (0, 1], got {budget!r}")
    out["kv_budget"] = None if budget is None else float(budget)
    rid = rec.get("request_id")
    if rid is not None and (not isinstance(rid, str) or not _ID_RE.match(rid)):
        raise _FieldError("request_id", f"must be 1-128 characters of [A-Za-z0-9._-] (it names the PNG file), "
                                        f"got {rid!r}")
    out["request_id"] = rid
    return out


def _fallback_id(raw: RawRecord) -> str:
    rid = raw.value.get("request_id") if isinstance(raw.value, dict) else None
    return rid if isinstance(rid, str) and _ID_RE.match(rid) else f"r{raw.index}"


def parse_records(records: Iterable[RawRecord | dict], num_classes: int | None = None) -> ParsedJob:
    """Validate and expand records. Plain dicts are accepted too (programs building jobs in Python).

    ``num_classes`` (from the served model) lets class labels be range-checked; without it only
    their type is. Policies are checked later against the workers' engine, which owns them.
    """
    requests: list[WireRequest] = []
    errors: list[RecordError] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(records):
        if not isinstance(raw, RawRecord):
            raw = RawRecord(i, raw, where=f"record {i}")
        if raw.error is not None:
            errors.append(RecordError(f"r{raw.index}", raw.index, "record", raw.error, raw.where))
            continue
        if not isinstance(raw.value, dict):
            errors.append(RecordError(f"r{raw.index}", raw.index, "record",
                                      f"expected a map of fields, got {type(raw.value).__name__}", raw.where))
            continue
        try:
            v = _check_record(raw.value, num_classes)
        except _FieldError as e:
            errors.append(RecordError(_fallback_id(raw), raw.index, e.field, e.reason, raw.where))
            continue
        base = v["request_id"] or f"r{raw.index}"
        ids = [base] if v["num"] == 1 else [f"{base}-{j}" for j in range(v["num"])]
        dup = next((rid for rid in ids if rid in seen), None)
        if dup is not None:
            errors.append(RecordError(base, raw.index, "request_id",
                                      f"duplicate request id {dup!r} (already used by record {seen[dup]})", raw.where))
            continue
        for j, rid in enumerate(ids):
            seen[rid] = raw.index
            requests.append(WireRequest(request_id=rid, class_label=v["class_label"], seed=v["seed"] + j,
                                        cfg=v["cfg"], top_k=v["top_k"], top_p=v["top_p"], policy=v["policy"],
                                        kv_budget=v["kv_budget"], record=raw.index))
    return ParsedJob(requests, errors)


def parse_job(data: bytes, fmt: str | None = None, name: str = "<job>", num_classes: int | None = None) -> ParsedJob:
    """Decode and validate a job file's bytes in one call (no cluster needed)."""
    return parse_records(decode_job(data, fmt, name), num_classes)


# ----- results ----------------------------------------------------------------------------
def result_record(job_id: str, request_id: str, *, class_label: Any = None, seed: Any = None,
                  error: str | None = None, field: str | None = None, record: int | None = None,
                  **extra: Any) -> dict:
    """A result as it travels back to clients. Successful results carry ``png`` (bytes),
    ``tokens`` and stats; failed ones ``error`` (and ``field`` for malformed input)."""
    rec = {"job_id": job_id, "request_id": request_id, "class_label": class_label, "seed": seed,
           "ok": error is None, "error": error}
    if field is not None:
        rec["field"] = field
    if record is not None:
        rec["record"] = record
    rec.update(extra)
    return rec


def error_result(job_id: str, err: RecordError) -> dict:
    """The result of a malformed record: same keys as a worker's error result."""
    return result_record(job_id, err.request_id, error=err.message, field=err.field, record=err.record,
                         tokens=None, png=None, kv_peak_bytes=0, seconds=0.0, worker=None, stats={})


def result_summary(result: dict) -> dict:
    """JSON-friendly copy of a result (the PNG bytes dropped)."""
    return {k: v for k, v in result.items() if not isinstance(v, (bytes, bytearray))}


def write_results_msgpack(results: Iterable[dict], path: str | Path) -> int:
    """Append results (PNG bytes inline) to a msgpack stream; returns how many were written."""
    n = 0
    with Path(path).open("ab") as f:
        for r in results:
            f.write(msgpack.packb(r, use_bin_type=True))
            n += 1
    return n


def iter_results_msgpack(path: str | Path) -> Iterator[dict]:
    with Path(path).open("rb") as f:
        yield from msgpack.Unpacker(f, raw=False, strict_map_key=False)


def encode_job_msgpack(records: Iterable[dict]) -> bytes:
    """A job as a msgpack stream of maps (the inverse of ``decode_job`` for msgpack)."""
    return b"".join(msgpack.packb(r, use_bin_type=True) for r in records)
