"""Job files and result streams on disk: framing only, no validation.

A **job file** holds one record per line (JSONL) or one msgpack map per record (a stream of
maps, or a single array of maps). A record asks for ``num`` images:

    {"class_label": "ring-striped", "num": 4, "seed": 10, "cfg": 1.5, "top_k": 100,
     "top_p": 0.95, "policy": "full", "kv_budget": 1.0, "request_id": "rings"}

What the fields mean and which values are allowed is ``engine.request.JobRecord`` (the one
validator); this module only turns bytes into records. A file that cannot be framed at all
(corrupt or truncated msgpack, not UTF-8) has no trustworthy records, so it is refused as a
whole with ``JobFileError``; a single JSONL line that is not JSON becomes a record that
fails on its own.

Limits (``check_records``, applied to files and to records from Python alike): a record may
be at most ``MAX_RECORD_BYTES`` (a JSONL line, or the strings/bytes/scalars of a decoded map)
and nest at most ``MAX_DEPTH`` levels; beyond that it becomes a record error (``record: ...``)
without being parsed further or sent anywhere. A JSON array file nested too deeply to parse
is a ``JobFileError``. Field ranges are ``engine.request``'s.

**Results** travel as ``ImageResult.to_record`` dicts; ``write_results_msgpack`` stores them
as a msgpack stream with the PNG bytes inline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from engine.request import ValidatedJob, validate_records

MAX_RECORD_BYTES = 64 << 10  # one record: a flat map of a few short fields needs well under 1 KiB
MAX_DEPTH = 8  # a record is a map of scalars (depth 2); deeper is never a valid record
MAX_RECORDS = 1_000_000  # records in one job file
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
    if len(records) > MAX_RECORDS:
        raise JobFileError(f"{name}: {len(records)} records, more than the limit of {MAX_RECORDS} per job")
    return check_records(records)


def record_limit_error(value: Any) -> str | None:
    """Why a decoded record is over the limits (too deep, too big), or None. Iterative, so a
    value nested 100,000 levels deep costs no recursion."""
    size, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep (a record is a map of plain values)"
        if isinstance(v, dict):
            size += 8 * len(v)
            stack.extend((k, depth + 1) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            size += 8 * len(v)
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, (str, bytes, bytearray)):
            size += len(v)
        else:
            size += 8
        if size > MAX_RECORD_BYTES:
            return f"larger than the {MAX_RECORD_BYTES}-byte limit of one record"
    return None


def check_records(records: Sequence[RawRecord | dict]) -> list[RawRecord]:
    """Records (decoded, or plain dicts) -> RawRecords, with any record over the limits replaced
    by an error record (its value dropped, so it is never pickled or echoed)."""
    out = []
    for i, r in enumerate(records):
        raw = r if isinstance(r, RawRecord) else RawRecord(i, r, where=f"record {i}")
        if raw.error is None:
            why = record_limit_error(raw.value)
            if why is not None:
                raw = RawRecord(raw.index, None, error=why, where=raw.where)
        out.append(raw)
    return out


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
        except RecursionError:
            raise JobFileError(f"{name}: JSON nested too deeply to read (a record nests at most {MAX_DEPTH} "
                               "levels)") from None
        if not isinstance(arr, list):
            raise JobFileError(f"{name}: expected a JSON array of records")
        return [RawRecord(i, v, where=f"{name} record {i}") for i, v in enumerate(arr)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        if len(line) > MAX_RECORD_BYTES:
            records.append(RawRecord(len(records), None, where=where,
                                     error=f"{len(line)} characters, more than the {MAX_RECORD_BYTES}-byte limit "
                                           "of one record"))
            continue
        try:
            records.append(RawRecord(len(records), json.loads(line), where=where))
        except json.JSONDecodeError as e:
            records.append(RawRecord(len(records), None, error=f"invalid JSON at column {e.colno}: {e.msg}",
                                     where=where))
        except RecursionError:
            records.append(RawRecord(len(records), None, where=where,
                                     error=f"nested more than {MAX_DEPTH} levels deep (a record is a map of "
                                           "plain values)"))
    return records


def _decode_msgpack(data: bytes, name: str) -> list[RawRecord]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1),
                                max_str_len=MAX_RECORD_BYTES, max_bin_len=MAX_RECORD_BYTES,
                                max_array_len=MAX_RECORDS, max_map_len=4096, max_ext_len=MAX_RECORD_BYTES)
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


# ----- results ----------------------------------------------------------------------------
def result_summary(result: dict) -> dict:
    """JSON-friendly copy of a result record (the PNG bytes dropped)."""
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


def validate_job(records: Iterable[RawRecord | dict], class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, kind: str = "var",
                 resolutions: Sequence[str] | None = None) -> ValidatedJob:
    """Decoded records (or plain dicts from Python) -> requests and error results, through the
    one validator (``engine.request.validate_records``); ``kind`` "infinity" for text-to-image
    models (records carry a ``prompt``)."""
    raws = check_records(list(records))
    return validate_records([r.value for r in raws], class_names, num_classes, where=[r.where for r in raws],
                            decode_errors={i: r.error for i, r in enumerate(raws) if r.error is not None},
                            kind=kind, resolutions=resolutions)
