"""The OpenAI Images API surface of ``scalekv serve``: request body -> job record, errors, responses.

``POST /v1/images/generations`` takes OpenAI's fields (``model``, ``prompt``, ``n``, ``size``,
``response_format``, ``stream``; ``quality``, ``style``, ``user`` ... are accepted and ignored)
and scalekv's own as extra body fields (``seed``, ``cfg``, ``top_k``, ``top_p``, ``policy``,
``kv_budget``, ``class_label``, ``preview_every``). For the class-conditional models served here
the prompt *is* the class: a name (``"ring-striped"``) or an index (``"3"``); ``class_label``,
when given, wins over it.

Validation is the one validator's (``engine.request.validate_records``): the body becomes one
job record (``n`` -> ``num``) and every rule, message and field name comes from there; this
module only checks what the engine does not know (the OpenAI-level fields) and maps field names
back to the body's (``num`` -> ``n``, ``class_label`` -> ``prompt`` when the prompt named the
class). Errors are OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from engine.request import FieldError, short_repr, validate_records

ENGINE_FIELDS = ("seed", "cfg", "top_k", "top_p", "policy", "kv_budget", "class_label", "preview_every")
OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "stream")
IGNORED_FIELDS = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images")
RESPONSE_FORMATS = ("b64_json", "url")
DEFAULT_STREAM_PREVIEW_EVERY = 1  # a stream without preview_every previews every scale


class APIError(Exception):
    """An error answered as OpenAI does: HTTP ``status`` and ``{"error": {...}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or self.TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationCall:
    """A validated generation request: the job record for the scheduler and how to answer."""

    record: dict
    n: int
    response_format: str
    stream: bool
    prompt_is_class: bool
    policy: str | None


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def prompt_to_class(prompt: Any) -> int | str:
    """``"3"`` / ``3`` -> 3, ``"ring-striped"`` -> itself (the validator checks it against the model)."""
    if isinstance(prompt, str):
        text = prompt.strip()
        return int(text) if text.isdigit() else text
    return prompt


def parse_generation(body: Any, model: str, image_size: int, class_names: list[str] | None, num_classes: int,
                     max_n: int) -> GenerationCall:
    """Check the OpenAI-level fields, build the job record and run it through the one validator.
    Raises ``APIError`` (400 naming the body field, 404 for another model)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = [k for k in body if k not in (*OPENAI_FIELDS, *ENGINE_FIELDS, *IGNORED_FIELDS)]
    if unknown:
        raise _bad(unknown[0], f"unknown field (known fields: {', '.join((*OPENAI_FIELDS, *ENGINE_FIELDS))})")
    name = body.get("model")
    if name is not None and name != model:
        raise APIError(404, f"The model {short_repr(name)} does not exist: this server serves {model!r}",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise _bad("n", f"must be an integer in 1..{max_n}, got {short_repr(n)}")
    size = body.get("size")
    want = f"{image_size}x{image_size}"
    if size not in (None, "auto", want):
        raise _bad("size", f"model {model} makes {want} images only ('auto' or {want!r}), got {short_repr(size)}")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in RESPONSE_FORMATS:
        raise _bad("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {short_repr(fmt)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {short_repr(stream)}")
    if "class_label" in body and body["class_label"] is not None:
        label, from_prompt = body["class_label"], False
    elif body.get("prompt") is not None:
        label, from_prompt = prompt_to_class(body["prompt"]), True
    else:
        raise _bad("prompt", "missing (required): a class name or index, e.g. "
                             f"{(class_names or ['3'])[0]!r}")
    record: dict[str, Any] = {"class_label": label, "num": n, "request_id": "img",
                              "seed": body["seed"] if body.get("seed") is not None else secrets.randbelow(2**31)}
    for k in ("cfg", "top_k", "top_p", "policy", "kv_budget", "preview_every"):
        if body.get(k) is not None:
            record[k] = body[k]
    if stream and record.get("preview_every") is None:
        record["preview_every"] = DEFAULT_STREAM_PREVIEW_EVERY
    parsed = validate_records([record], class_names, num_classes)
    if parsed.errors:
        errs = parsed.errors[0].errors
        raise field_error(errs, from_prompt)
    return GenerationCall(record, n, fmt, stream, from_prompt, record.get("policy"))


def body_field(name: str, from_prompt: bool) -> str:
    """The body field a job-record field came from."""
    if name == "num":
        return "n"
    if name == "class_label" and from_prompt:
        return "prompt"
    return name


def field_error(errors: tuple[FieldError, ...] | list[FieldError], from_prompt: bool) -> APIError:
    fields = [body_field(e.field, from_prompt) for e in errors]
    message = "; ".join(f"{f}: {e.reason}" for f, e in zip(fields, errors))
    return APIError(400, message, param=fields[0] if fields else None)


def image_index(request_id: str, n: int) -> int:
    """``img`` -> 0, ``img-3`` -> 3 (``JobRecord.image_ids``)."""
    return 0 if n == 1 else int(request_id.rsplit("-", 1)[1])


def extension(res: dict, e2e_s: float | None, ttfs_s: float | None) -> dict:
    """scalekv's per-image extension field of a response (``data[i].scalekv``): what makes the
    image reproducible and what it cost."""
    stats = res.get("stats") or {}
    return {
        "request_id": res.get("request_id"), "job_id": res.get("job_id"), "class_label": res.get("class_label"),
        "seed": res.get("seed"), "tokens": res.get("tokens"), "kv_peak_bytes": res.get("kv_peak_bytes"),
        "engine_seconds": res.get("seconds"), "policy": stats.get("policy"), "kv_budget": stats.get("kv_budget"),
        "worker": stats.get("worker"), "e2e_s": None if e2e_s is None else round(e2e_s, 6),
        "ttfs_s": None if ttfs_s is None else round(ttfs_s, 6),
    }
