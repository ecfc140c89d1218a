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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MAX_NUM = 10_000  # per record: a typo like num=1e6 should be an error, not a day of compute
MAX_SEED = 2**63
MAX_CFG = 100.0  # VAR models use 1.5-10; far beyond that the image is noise
MAX_TOP_K = 1 << 20
MAX_ECHO = 200  # characters of a bad value quoted in an error
MAX_PREVIEW_EVERY = 1000
MAX_PROMPT = 4096  # characters of a prompt (the text encoder truncates to its token limit anyway)
MAX_H_DIV_W = 100.0
REQUEST_FIELDS = ("class_label", "prompt", "negative_prompt", "h_div_w", "aspect_ratio", "resolution", "seed", "cfg",
                  "tau", "top_k", "top_p", "policy", "kv_budget", "request_id",
                  "preview_every")
MODEL_KINDS = ("var", "infinity")  # class-conditional VAR, text-to-image Infinity
INFINITY_ONLY = ("prompt", "negative_prompt", "h_div_w", "aspect_ratio", "resolution", "tau")
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


def parse_aspect_ratio(text: str) -> float:
    """``"16:9"`` (width:height, as screens are named) -> h_div_w = 9 / 16. Raises ValueError."""
    w, sep, h = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        wf, hf = float(w), float(h)
    except ValueError:
        raise ValueError(f"expected WIDTH:HEIGHT such as '16:9' or '1:1', got {short_repr(text)}") from None
    if not (wf > 0 and hf > 0) or wf != wf or hf != hf or hf / wf > MAX_H_DIV_W or wf / hf > MAX_H_DIV_W:
        raise ValueError(f"both sides must be > 0 and within a ratio of {MAX_H_DIV_W:g}, got {short_repr(text)}")
    return hf / wf


def _kind(info: ValidationInfo) -> str | None:
    """The model kind named by the validation context: ``"infinity"``, ``"var"`` (a context with
    class facts but no kind is VAR, as before Infinity existed), or None (no context)."""
    ctx = info.context or {}
    if ctx.get("kind") is not None:
        return ctx["kind"]
    return "var" if ("class_names" in ctx or "num_classes" in ctx) else None


class ImageRequest(BaseModel):
    """One image to generate. ``cfg`` / ``tau`` / ``top_k`` / ``top_p`` of None take the model's
    defaults; ``policy`` / ``kv_budget`` of None take the engine's.

    Class-conditional models (VAR) take ``class_label``: an index or, for models with named
    classes, a name (``"ring-striped"``); the engine resolves names. Text-to-image models
    (Infinity) take ``prompt`` (and optionally ``negative_prompt``, which replaces the learned
    unconditional text), an aspect ratio as ``h_div_w`` (height / width) or ``aspect_ratio``
    ``"W:H"`` (``"16:9"``), snapped by the engine to the model's nearest template, a named
    ``resolution`` (``"0.06M"``, ``"0.25M"``, ``"1M"``; the model's default when None) and
    ``tau`` (logit temperature). Exactly one of ``class_label`` / ``prompt``, as the model's
    kind asks: the validation context (``kind``) says which; without one, exactly one is given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    class_label: int | str | None = Field(None, union_mode="left_to_right", validate_default=True)
    prompt: str | None = Field(None, max_length=MAX_PROMPT, validate_default=True)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT)
    h_div_w: float | None = Field(None, gt=0, le=MAX_H_DIV_W, allow_inf_nan=False,
                                  description="height / width (default 1.0)")
    aspect_ratio: str | None = Field(None, max_length=32, description="'W:H', e.g. '16:9'")
    resolution: str | None = Field(None, min_length=1, max_length=16)
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    cfg: float | None = Field(None, ge=0, le=MAX_CFG, allow_inf_nan=False, description="guidance scale")
    tau: float | None = Field(None, gt=0, le=MAX_CFG, allow_inf_nan=False, description="logit temperature")
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
    def _class_label(cls, v: Any, info: ValidationInfo) -> int | str | None:
        kind = _kind(info)
        if v is None:
            if kind == "var":
                raise ValueError("missing (required)")
            return None  # Infinity, or no context: the prompt check decides
        if kind == "infinity":
            raise ValueError("the model is text-to-image: give a prompt, not a class_label")
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"must be a class index or name, got {type(v).__name__} {short_repr(v)}")
        ctx = info.context or {}
        if "class_names" in ctx or "num_classes" in ctx:
            return resolve_class(v, ctx.get("class_names"), ctx.get("num_classes"))
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = _kind(info)
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        if kind == "infinity" and v is None:
            raise ValueError("missing (required: the model is text-to-image)")
        if kind == "var" and v is not None:
            raise ValueError("the model is class-conditional: give a class_label, not a prompt")
        if kind is None and v is None and info.data.get("class_label") is None and "class_label" in info.data:
            raise ValueError("give a prompt (text-to-image models) or a class_label (class-conditional models)")
        if kind is None and v is not None and info.data.get("class_label") is not None:
            raise ValueError("give a prompt or a class_label, not both")
        return v

    @field_validator("negative_prompt", "h_div_w", "aspect_ratio", "resolution", "tau")
    @classmethod
    def _infinity_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and _kind(info) == "var":
            raise ValueError("only text-to-image models take it; this model is class-conditional")
        if info.field_name == "negative_prompt" and v is not None and not v.strip():
            raise ValueError("must not be empty (leave it out for the learned unconditional text)")
        if info.field_name == "aspect_ratio" and v is not None:
            parse_aspect_ratio(v)
        if info.field_name == "resolution" and v is not None:
            known = (info.context or {}).get("resolutions")
            if known is not None and v not in known:
                raise ValueError(f"unknown resolution {short_repr(v)} (the model has: {', '.join(known)})")
        return v

    @model_validator(mode="after")
    def _one_ratio(self) -> ImageRequest:
        both = self.h_div_w is not None and self.aspect_ratio is not None
        if both and abs(parse_aspect_ratio(self.aspect_ratio) - self.h_div_w) > 1e-9 * self.h_div_w:
            raise ValueError(f"h_div_w: {self.h_div_w} disagrees with aspect_ratio {self.aspect_ratio!r} "
                             "(give one of them)")
        return self

    @property
    def kind(self) -> str:
        """``"infinity"`` for a prompt, else ``"var"``."""
        return "infinity" if self.prompt is not None else "var"

    @property
    def height_over_width(self) -> float:
        """The requested aspect ratio (height / width) before snapping: ``h_div_w``, else
        ``aspect_ratio``, else 1."""
        if self.h_div_w is not None:
            return float(self.h_div_w)
        if self.aspect_ratio is not None:
            return parse_aspect_ratio(self.aspect_ratio)
        return 1.0

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
        if not err["loc"] and err["type"] == "value_error":  # a whole-record rule that names its field
            head, sep, rest = err["msg"].removeprefix("Value error, ").partition(": ")
            if sep and head in JOB_FIELDS:
                out.setdefault(head, []).append(rest)
                continue
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
                     decode_errors: dict[int, str] | None = None, kind: str = "var",
                     resolutions: Sequence[str] | None = None) -> ValidatedJob:
    """Validate and expand job records (dicts). Every record ends as its requests or as one
    error naming every bad field. Ids are unique within the job: the first valid record that
    claims an id wins, a later one is an error; an error result takes its record's id (or the
    default ``r<index>``) only when nothing else holds it, else ``#<record>`` (a name no request
    can have), so an error can never shadow a valid image. ``decode_errors``: records that could not even be decoded.
    ``kind``: the model's kind (``MODEL_KINDS``): ``"var"`` records need a ``class_label``,
    ``"infinity"`` records a ``prompt`` (and a ``resolution`` among ``resolutions``)."""
    records = list(records)
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    if kind == "var":
        ctx = {"kind": kind, "class_names": list(class_names) if class_names is not None else None,
               "num_classes": num_classes}
    else:
        ctx = {"kind": kind, "resolutions": list(resolutions) if resolutions is not None else None}
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
    tokens: list[int] | None = None  # every scale's token ids, flattened coarse to fine (Infinity: each
    # token's bits packed into one int, bit 0 the most significant: weights 2^(d-1) .. 1)
    image: np.ndarray | None = None  # uint8 [H, W, 3] (in-process only)
    png: bytes | None = None  # the image as it crosses processes
    kv_peak_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    fields: tuple[str, ...] = ()
    record: int | None = None  # index of the job record it came from
    stats: dict = field(default_factory=dict)
    prompt: str | None = None  # text-to-image requests: the prompt (class_label is None)

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
            "prompt": self.prompt,
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
                   stats=dict(rec.get("stats") or {}), prompt=rec.get("prompt"))

    def decoded_image(self) -> np.ndarray:
        """The image as uint8 [H, W, 3], decoding the PNG if it came over the wire."""
        if self.image is None and self.png is not None:
            from PIL import Image

            self.image = np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB"))
        return self.image


# Names of the first round, kept so existing code keeps working.
GenerationRequest = ImageRequest
GenerationResult = ImageResult
