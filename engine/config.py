"""``EngineConfig``: every memory and throughput knob of the engine, in one typed dataclass.

Each field is also a command-line flag (``--kv-pool-bytes``; the CLI generates the flags from
these fields and their ``help`` metadata, so a knob is declared once) and an environment
override (``SCALEKV_KV_POOL_BYTES``). Flags win over the environment, which wins over the
defaults. This module does not import torch: the CLI builds its parser from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from memory.policy_names import DRAFTER_MODES, POLICIES, SCORE_QUERIES, SCORES

DTYPES = ("auto", "float32", "bfloat16")
ATTENTION_BACKENDS = ("auto", "torch", "xformers", "varlen", "flashinfer")
HOST_MALLOC = ("tuned", "system")
DEFAULT_CPU_POOL_BYTES = 1 << 30


def _knob(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EngineConfig:
    """Memory and throughput knobs (see the module docstring for flags and environment)."""

    block_size: int = _knob(16, "tokens per KV page")
    kv_pool_bytes: int | None = _knob(None, "KV pool size, e.g. 512MiB (default: 1 GiB on CPU; on CUDA "
                                            "max_running full-cache requests, capped by gpu_memory_utilization)",
                                      parse="bytes")
    gpu_memory_utilization: float = _knob(0.9, "CUDA: most of the free GPU memory the pool may take")
    max_batch_tokens: int = _knob(16384, "tokens advanced per step, both CFG branches counted")
    max_running: int = _knob(64, "requests admitted at once")
    policy: str = _knob("full", "KV policy of requests that name none", choices=POLICIES)
    kv_budget: float = _knob(1.0, "kept fraction of the KV cache for compressing policies (0.1 = 10%%)")
    dtype: str = _knob("auto", "compute and K/V dtype: auto is bf16 on CUDA and on CPUs with native bf16, "
                               "float32 elsewhere (AVX2 bf16 matmuls are 20-70x slower)", choices=DTYPES)
    attention_backend: str = _knob("auto", "paged attention backend: auto = torch SDPA everywhere; flashinfer "
                                           "(optional extra, CUDA bf16) reads the pool in place; varlen = torch's "
                                           "varlen_attn for unequal histories (CUDA)", choices=ATTENTION_BACKENDS)
    host_malloc: str = _knob("tuned", "CPU: tuned raises glibc's mmap/trim thresholds so a step's large temporaries "
                                      "are reused instead of page-faulted in again (no effect on results); system "
                                      "leaves the allocator as it is", choices=HOST_MALLOC)
    profile_path: str | None = _knob(None, "scale profile JSON for scalekv (default: the model's shipped one)")
    window_size: int = _knob(16, "observation window of queries (scalekv: a perfect square, grid centres)")
    pool_kernel: int | None = _knob(None, "1-D smoothing kernel of the window scores (odd; default: the "
                                          "policy's, 5, or 1 for the -allq policies)")
    pooling: str = _knob("max", "smoothing of the window scores", choices=("max", "avg"))
    score_queries: str | None = _knob(None, "queries that score candidate tokens: the observation window or all "
                                            "current-scale queries (default: the policy's)", choices=SCORE_QUERIES)
    score: str | None = _knob(None, "score by softmax attention or raw logits (default: the policy's)",
                              choices=SCORES)
    drafter_mode: str | None = _knob(None, "scalekv drafters: as calibrated, sticky (a drafter once, a drafter at "
                                           "every compressed scale) or fixed (the most frequent layers)",
                                     choices=DRAFTER_MODES)
    num_drafters: int | None = _knob(None, "drafter_mode fixed: how many drafter layers (default: the mean per "
                                           "scale)")
    budget_delta: float | None = _knob(None, "scalekv: the refiner budget decays by this many tokens per "
                                             "compressed scale (default: drafters keep all)")
    peak_limit: float | None = _knob(None, "scalekv: cap every step's KV peak (pages + scratch) at this fraction "
                                           "of full's, e.g. 0.12, by trimming refiners of the scale before the "
                                           "peak (default: the paper's plan, exactly layers x U kept)")
    text_encoder: str | None = _knob(None, "text-to-image models (Infinity): a local directory holding the "
                                           "prompt encoder (a saved T5EncoderModel + tokenizer, e.g. Flan-T5-XL); "
                                           "nothing is downloaded")

    def __post_init__(self) -> None:
        if isinstance(self.budget_delta, str):  # from the environment
            self.budget_delta = None if self.budget_delta.lower() in ("", "none") else float(self.budget_delta)
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.kv_pool_bytes is not None and self.kv_pool_bytes <= 0:
            raise ValueError(f"kv_pool_bytes: must be > 0, got {self.kv_pool_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens: must be >= 1, got {self.max_batch_tokens}")
        if self.max_running < 1:
            raise ValueError(f"max_running: must be >= 1, got {self.max_running}")
        if not 0 < self.kv_budget <= 1:
            raise ValueError(f"kv_budget: must be a fraction in (0, 1], got {self.kv_budget}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.host_malloc not in HOST_MALLOC:
            raise ValueError(f"host_malloc: expected one of {', '.join(HOST_MALLOC)}, got {self.host_malloc!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r} (available: {', '.join(POLICIES)})")
        if self.window_size < 1 or math.isqrt(self.window_size) ** 2 != self.window_size:
            raise ValueError(f"window_size: must be a perfect square >= 1 (grid window), got {self.window_size}")
        if self.pool_kernel is not None and (self.pool_kernel < 1 or self.pool_kernel % 2 == 0):
            raise ValueError(f"pool_kernel: must be an odd number >= 1, got {self.pool_kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling: expected 'max' or 'avg', got {self.pooling!r}")
        for name, allowed in (("score_queries", SCORE_QUERIES), ("score", SCORES), ("drafter_mode", DRAFTER_MODES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.num_drafters is not None and self.num_drafters < 0:
            raise ValueError(f"num_drafters: must be >= 0, got {self.num_drafters}")
        if self.budget_delta is not None and self.budget_delta < 0:
            raise ValueError(f"budget_delta: must be >= 0, got {self.budget_delta}")
        if isinstance(self.peak_limit, str):  # from the environment
            self.peak_limit = None if self.peak_limit.lower() in ("", "none") else float(self.peak_limit)
        if self.peak_limit is not None and not 0 < self.peak_limit <= 1:
            raise ValueError(f"peak_limit: must be a fraction in (0, 1] of full's peak, got {self.peak_limit}")

    @classmethod
    def from_values(cls, values: dict[str, Any], environ: dict[str, str] | None = None) -> EngineConfig:
        """Values given (None = not given) over ``SCALEKV_<FIELD>`` environment overrides over
        the defaults. Unknown keys are ignored, so an argparse namespace's ``vars()`` works."""
        environ = os.environ if environ is None else environ
        out = {}
        for f in fields(cls):
            env = environ.get(f"SCALEKV_{f.name.upper()}")
            if env is not None:
                out[f.name] = _env_value(f, env)
            v = values.get(f.name)
            if v is not None:
                out[f.name] = v
        return cls(**out)

    @classmethod
    def from_args(cls, args: Any) -> EngineConfig:
        return cls.from_values(vars(args))

    def to_dict(self) -> dict:
        return asdict(self)

    def budget_settings(self, kv_budget: float):
        """The ``memory.budgets.BudgetSettings`` of this config at ``kv_budget``: the one mapping
        from engine knobs to plan knobs (VAR and Infinity engines, the scheduler's page demand)."""
        from memory.budgets import BudgetSettings

        return BudgetSettings(kv_budget=kv_budget, window_size=self.window_size, delta=self.budget_delta,
                              align=self.block_size, drafter_mode=self.drafter_mode,
                              num_drafters=self.num_drafters, peak_limit=self.peak_limit)


def _env_value(f: Any, text: str) -> Any:
    """Convert a SCALEKV_<FIELD> environment value to the field's type, naming the field on error."""
    type_text = str(f.type)
    try:
        if f.metadata.get("parse") == "bytes":
            return parse_bytes(text, f.name)
        if "float" in type_text:
            return float(text)
        if "int" in type_text:
            return int(text)
    except ValueError:
        raise ValueError(f"{f.name}: cannot parse SCALEKV_{f.name.upper()}={text!r} as {type_text}") from None
    return text


def parse_bytes(text: str | int, name: str = "kv_pool_bytes") -> int:
    """'512MiB', '2GB', '1e9' or a plain integer -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    try:
        for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if s.endswith(unit):
                return int(float(s[: -len(unit)]) * mult)
        return int(float(s))
    except ValueError:
        raise ValueError(f"{name}: cannot parse {text!r} as a size (try 512MiB)") from None
