"""Request and result types shared by the reference loop, the paged engine and the cluster."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationRequest:
    """One image to generate. ``cfg`` / ``top_k`` / ``top_p`` of None take the model defaults."""

    class_label: int
    seed: int = 0
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    request_id: str = ""
    policy: str | None = None
    kv_budget: float | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self, default_cfg: float, default_top_k: int, default_top_p: float) -> GenerationRequest:
        return GenerationRequest(
            class_label=self.class_label,
            seed=self.seed,
            cfg=default_cfg if self.cfg is None else self.cfg,
            top_k=default_top_k if self.top_k is None else self.top_k,
            top_p=default_top_p if self.top_p is None else self.top_p,
            request_id=self.request_id,
            policy=self.policy,
            kv_budget=self.kv_budget,
            extra=dict(self.extra),
        )


def validate_request(req: GenerationRequest, num_classes: int) -> None:
    """Raise ValueError naming the offending field."""
    if isinstance(req.class_label, bool) or not isinstance(req.class_label, int):
        raise ValueError(f"class_label: must be an integer, got {req.class_label!r}")
    if not 0 <= req.class_label < num_classes:
        raise ValueError(f"class_label: {req.class_label} is not a class of this model (0..{num_classes - 1})")
    if isinstance(req.seed, bool) or not isinstance(req.seed, int):
        raise ValueError(f"seed: must be an integer, got {req.seed!r}")
    if not 0 <= req.seed < 2**63:
        raise ValueError(f"seed: must be in [0, 2^63), got {req.seed}")
    if req.cfg is not None and (
        isinstance(req.cfg, bool) or not isinstance(req.cfg, (int, float)) or not math.isfinite(req.cfg)
        or req.cfg < 0
    ):
        raise ValueError(f"cfg: must be a finite number >= 0, got {req.cfg!r}")
    if req.top_k is not None and (isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 0):
        raise ValueError(f"top_k: must be an integer >= 0 (0 disables), got {req.top_k!r}")
    if req.top_p is not None and (
        isinstance(req.top_p, bool) or not isinstance(req.top_p, (int, float)) or not 0 <= req.top_p <= 1
    ):
        raise ValueError(f"top_p: must be in [0, 1] (0 disables), got {req.top_p!r}")
    if req.kv_budget is not None and (
        isinstance(req.kv_budget, bool) or not isinstance(req.kv_budget, (int, float))
        or not math.isfinite(req.kv_budget) or not 0 < req.kv_budget <= 1
    ):
        raise ValueError(f"kv_budget: must be a fraction in (0, 1], got {req.kv_budget!r}")


@dataclass
class GenerationResult:
    """A finished request: its image, its tokens and what it cost. ``error`` is set instead of
    an image when the request failed (the cause, naming the field for bad input)."""

    request_id: str
    class_label: int
    seed: int
    tokens: list[int] | None = None  # every scale's token ids, flattened coarse to fine
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    kv_peak_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def png_bytes(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()

    def summary(self) -> dict:
        """JSON-friendly record (no image)."""
        d = {
            "request_id": self.request_id,
            "class_label": self.class_label,
            "seed": self.seed,
            "tokens": self.tokens,
            "kv_peak_bytes": int(self.kv_peak_bytes),
            "seconds": round(float(self.seconds), 6),
        }
        if self.error is not None:
            d["error"] = self.error
        d.update(self.stats)
        return d
