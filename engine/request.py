"""The one request type and the one result type, from job file / CLI / Python API to pixels and back.

``ImageRequest`` is what a user asks for: one image of a class with a seed and sampling and KV
knobs. It is the same object whether it was typed in Python, built by ``scalekv generate`` from
flags, or read from a job file by the scheduler; the engine runs it as it is. ``JobRecord`` is
one line of a job file: an ``ImageRequest`` plus ``num`` (how many seeds), expanded by
``validate_records``. ``ImageResult`` is what comes back; ``ImageResult.to_record`` is the one
schema of ``results.jsonl`` for ``scalekv generate``, ``scalekv submit`` and the Python API.

What crosses a process boundary (Ray): an ``ImageRequest`` (plain fields, pickled) from the
scheduler to a worker, and ``ImageResult.to_record(png=...)`` (a dict of plain values with the
image as PNG bytes) back. Tensors and arrays never leave the worker.

Validation is pydantic v2 (chosen over msgspec because it reports *every* bad field of a
record in one pass, with its location, where msgspec stops at the first; the cost, ~10 us per
record, is nothing next to generating an image). Every rule lives here, worded once, and the
model-dependent checks (class range or name) take the model's class names from the
validation context, so the scheduler and the engine apply the same ones.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MAX_NUM = 10_000  # per record: a typo like num=1e6 should be an error, not a day of compute
MAX_SEED = 2**63
MAX_CFG = 100.0  # VAR models use 1.5-10; far beyond that the image is noise
MAX_TOP_K = 1 << 20
MAX_ECHO = 200  # characters of a bad value quoted in an error
MAX_PREVIEW_EVERY = 1000
REQUEST_FIELDS = ("class_label", "seed", "cfg", "top_k", "top_p", "policy", "kv_budget", "request_id",
                  "preview_every")
JOB_FIELDS = (*REQUEST_FIELDS, "num")


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr`` cut to ``limit`` characters: errors quote a bad value, never all 50 MB of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def resolve_class(value: int | str, class_names: Sequence[str] | None, num_classes: int | None) -> int:
    """A class index or name -> the index, checked against the model. Raises ValueError."""
    if isinstance(value, str):
        if class_names is None:
            raise ValueError(f"class name {short_repr(value)} needs a model with named classes; use an index")
        if value not in class_names:
            raise ValueError(f"unknown class {short_repr(value)} (classes: {', '.join(class_names)})")
        return class_names.index(value)
    n = len(class_names) if class_names is not None else num_classes
    if value < 0 or (n is not None and value >= n):
        hint = f"the model has classes 0..{n - 1}" if n is not None else "must be >= 0"
        raise ValueError(f"unknown class {value} ({hint})")
    return value


class ImageRequest(BaseModel):
    """One image to generate. ``cfg`` / ``top_k`` / ``top_p`` of None take the model's defaults;
    ``policy`` / ``kv_budget`` of None take the engine's. ``class_label`` is an index or, for
    models with named classes, a name (``"ring-striped"``); the engine resolves names."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    class_label: int | str = Field(union_mode="left_to_right")
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    cfg: float | None = Field(None, ge=0, le=MAX_CFG, allow_inf_nan=False, description="guidance scale")
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="0 disables")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="0 disables")
    policy: str | None = Field(None, min_length=1, max_length=64)
    kv_budget: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    request_id: str = Field("", max_length=128)
    preview_every: int | None = Field(None, ge=1, le=MAX_PREVIEW_EVERY,
                                      description="emit a decoded preview every k-th scale (None: no previews)")
    job_id: str | None = None  # set by the scheduler; None in-process

    @field_validator("class_label", mode="before")
    @classmethod
    def _class_label(cls, v: Any, info: ValidationInfo) -> int | str:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"must be a class index or name, got {type(v).__name__} {short_repr(v)}")
        ctx = info.context or {}
        if "class_names" in ctx or "num_classes" in ctx:
            return resolve_class(v, ctx.get("class_names"), ctx.get("num_classes"))
        return v

    def resolved(self, default_cfg: float, default_top_k: int, default_top_p: float) -> ImageRequest:
        """A copy with the model's sampling defaults filled in."""
        return self.model_copy(update={
            "cfg": default_cfg if self.cfg is None else self.cfg,
            "top_k": default_top_k if self.top_k is None else self.top_k,
            "top_p": default_top_p if self.top_p is None else self.top_p,
        })

    @property
    def key(self) -> str:
        """Unique across a cluster: the job and the request id."""
        return f"{self.job_id}/{self.request_id}" if self.job_id else self.request_id


class JobRecord(ImageRequest):
    """One record of a job file: ``num`` images, image i with seed ``seed + i``."""

    num: int = Field(1, ge=1, le=MAX_NUM)
    request_id: str | None = Field(None, pattern=ID_PATTERN)  # names the PNG files: filename-safe

    def image_ids(self, index: int) -> list[str]:
        """Request ids of the record's images: ``request_id`` (default ``r<index>``), suffixed
        ``-<i>`` when ``num > 1``."""
        base = self.request_id or f"r{index}"
        return [base] if self.num == 1 else [f"{base}-{i}" for i in range(self.num)]

    def expand(self, index: int) -> list[ImageRequest]:
        fields = self.model_dump(exclude={"num", "request_id", "job_id"})
        if self.seed + self.num > MAX_SEED:
            raise ValueError(f"seed: seed..seed+num-1 must lie in [0, 2^63), got seed {self.seed} with num {self.num}")
        return [ImageRequest.model_construct(**{**fields, "seed": self.seed + i, "request_id": rid})
                for i, rid in enumerate(self.image_ids(index))]


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def field_errors(e: ValidationError) -> list[FieldError]:
    """Pydantic's errors as one ``field: reason`` per field, values quoted at most ``MAX_ECHO``."""
    out: dict[str, list[str]] = {}
    for err in e.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "record"
        if err["type"] == "extra_forbidden":
            reason = f"unknown field (known fields: {', '.join(JOB_FIELDS)})"
        elif err["type"] == "missing":
            reason = "missing (required)"
        else:
            reason = err["msg"].removeprefix("Value error, ")
            if err["type"] != "value_error" and "input" in err:
                reason += f", got {short_repr(err['input'])}"
        out.setdefault(name, [])
        if reason not in out[name]:
            out[name].append(reason)
    return [FieldError(k, "; ".join(v)) for k, v in out.items()]


@dataclass(frozen=True)
class RecordError:
    """A record answered with an error instead of images: which record, which fields, why."""

    request_id: str
    record: int
    errors: tuple[FieldError, ...]
    where: str = ""

    @property
    def fields(self) -> list[str]:
        return [e.field for e in self.errors]

    @property
    def message(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return "; ".join(str(e) for e in self.errors) + at

    def result(self, job_id: str | None = None) -> ImageResult:
        return ImageResult(request_id=self.request_id, class_label=None, seed=None, job_id=job_id,
                           record=self.record, error=self.message, fields=tuple(self.fields))


@dataclass
class ValidatedJob:
    """A job after validation: the requests to run and the records answered with an error."""

    requests: list[ImageRequest]
    errors: list[RecordError]
    record_of: dict[str, int] = field(default_factory=dict)  # request id -> record index

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.errors)


def validate_records(records: Iterable[Any], class_names: Sequence[str] | None = None,
                     num_classes: int | None = None, where: Sequence[str] | None = None,
                     decode_errors: dict[int, str] | None = None) -> ValidatedJob:
    """Validate and expand job records (dicts). Every record ends as its requests or as one
    error naming every bad field. Ids are unique within the job: the first valid record that
    claims an id wins, a later one is an error; an error result takes its record's id (or the
    default ``r<index>``) only when nothing else holds it, else ``#<record>`` (a name no request
    can have), so an error can never shadow a valid image. ``decode_errors``: records that could not even be decoded."""
    records = list(records)
    ctx = {"class_names": list(class_names) if class_names is not None else None, "num_classes": num_classes}
    decode_errors = decode_errors or {}
    valid: list[tuple[int, list[ImageRequest]]] = []
    failed: list[tuple[int, str | None, list[FieldError]]] = []
    taken: dict[str, int] = {}
    for i, rec in enumerate(records):
        if i in decode_errors:
            failed.append((i, None, [FieldError("record", decode_errors[i])]))
            continue
        if not isinstance(rec, dict):
            failed.append((i, None, [FieldError("record", f"expected a map of fields, got {type(rec).__name__}")]))
            continue
        own_id = rec.get("request_id") if isinstance(rec.get("request_id"), str) else None
        scheduler_only = [FieldError("job_id", f"unknown field (known fields: {', '.join(JOB_FIELDS)})")] \
            if "job_id" in rec else []
        try:
            reqs = JobRecord.model_validate({k: v for k, v in rec.items() if k != "job_id"}, context=ctx).expand(i)
        except ValidationError as e:
            failed.append((i, own_id, scheduler_only + field_errors(e)))
            continue
        except ValueError as e:
            name, _, reason = str(e).partition(": ")
            failed.append((i, own_id, [FieldError(name, reason)]))
            continue
        if scheduler_only:
            failed.append((i, own_id, scheduler_only))
            continue
        dup = next((r.request_id for r in reqs if r.request_id in taken), None)
        if dup is not None:
            why = "" if own_id else f" (record {i} has no request_id; its default is {dup!r})"
            failed.append((i, own_id, [FieldError(
                "request_id", f"duplicate request id {dup!r}: already used by record {taken[dup]}{why}")]))
            continue
        for r in reqs:
            taken[r.request_id] = i
        valid.append((i, reqs))
    errors = []
    for i, own_id, errs in failed:
        wanted = own_id if own_id and len(own_id) <= 128 else f"r{i}"
        rid = wanted if wanted not in taken else f"#{i}"
        taken[rid] = i
        errors.append(RecordError(rid, i, tuple(errs), where[i] if where is not None else f"record {i}"))
    requests = [r for _, reqs in valid for r in reqs]
    return ValidatedJob(requests, errors, {r.request_id: i for i, reqs in valid for r in reqs})


@dataclass
class ImageResult:
    """A finished request: its image, its tokens and what it cost; or ``error`` (naming the
    ``fields`` at fault for bad input) instead of an image."""

    request_id: str
    class_label: int | str | None
    seed: int | None
    job_id: str | None = None
    tokens: list[int] | None = None  # every scale's token ids, flattened coarse to fine
    image: np.ndarray | None = None  # uint8 [H, W, 3] (in-process only)
    png: bytes | None = None  # the image as it crosses processes
    kv_peak_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    fields: tuple[str, ...] = ()
    record: int | None = None  # index of the job record it came from
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def png_bytes(self) -> bytes:
        if self.png is None:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(self.image).save(buf, format="PNG")
            self.png = buf.getvalue()
        return self.png

    def to_record(self, png: bytes | str | None = None) -> dict:
        """The one results schema (``results.jsonl``, the wire back from workers, the Python
        API). ``png``: PNG bytes on the wire, the file name in ``results.jsonl``."""
        return {
            "job_id": self.job_id,
            "request_id": self.request_id,
            "record": self.record,
            "class_label": self.class_label,
            "seed": self.seed,
            "ok": self.ok,
            "error": self.error,
            "fields": list(self.fields),
            "png": png,
            "tokens": self.tokens,
            "kv_peak_bytes": int(self.kv_peak_bytes),
            "seconds": round(float(self.seconds), 6),
            "stats": dict(self.stats),
        }

    @classmethod
    def from_record(cls, rec: dict) -> ImageResult:
        png = rec.get("png")
        return cls(request_id=rec["request_id"], class_label=rec.get("class_label"), seed=rec.get("seed"),
                   job_id=rec.get("job_id"), tokens=rec.get("tokens"),
                   png=png if isinstance(png, (bytes, bytearray)) else None,
                   kv_peak_bytes=rec.get("kv_peak_bytes", 0), seconds=rec.get("seconds", 0.0),
                   error=rec.get("error"), fields=tuple(rec.get("fields") or ()), record=rec.get("record"),
                   stats=dict(rec.get("stats") or {}))

    def decoded_image(self) -> np.ndarray:
        """The image as uint8 [H, W, 3], decoding the PNG if it came over the wire."""
        if self.image is None and self.png is not None:
            from PIL import Image

            self.image = np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB"))
        return self.image


# Names of the first round, kept so existing code keeps working.
GenerationRequest = ImageRequest
GenerationResult = ImageResult
