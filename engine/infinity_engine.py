"""``InfinityEngine``: the in-process engine for text-to-image Infinity models.

It is an ``ImageEngine`` (same admission with exact page reservation, FIFO, ``max_running`` and
``max_batch_tokens`` scheduling, error handling, ``generate`` / ``generate_stream`` / ``stats``)
with what differs for Infinity overridden:

- the pool's heads / head_dim come from ``spec.model``; the runner is ``InfinityRunner``;
- requests carry a ``prompt`` (and ``negative_prompt``), encoded here by the local text encoder
  (``EngineConfig.text_encoder``, or one passed in), one prompt at a time so a prompt's states
  never depend on its neighbours; the request's aspect ratio is snapped to the model's nearest
  template and its resolution checked;
- page demand is per request: the plan of its schedule (``engine.infinity_plans.infinity_plan``,
  shared with the scheduler): ``full`` or a compressing policy over the request's h x w grids
  (scalekv with a profile calibrated on that schedule, ``EngineConfig.profile_path``);
- at admission each request's 2-row text condition (pooled text, AdaLN rows, every layer's
  cross-attention K/V) is computed once and kept with the request until it finishes;
- a finished request's tokens are its bits packed into one integer per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from memory.manager import KVPlan, MemoryManager, RequestTooLargeError
from memory.policy_names import POLICIES
from memory.pool import KVPool

from .api import ImageEngine, _error_result
from .config import DEFAULT_CPU_POOL_BYTES, EngineConfig
from .infinity_plans import infinity_plan
from .infinity_runner import InfinityRequestState, InfinityRunner, pack_bits
from .models.registry import LoadedInfinity
from .precision import resolve_dtype
from .request import ImageRequest, field_errors
from .sampling import make_generator

INFINITY_POLICIES = POLICIES  # every policy; scalekv needs a profile of the request's schedule


class PromptEncoder(Protocol):
    """What the engine needs of a text encoder (``engine.text.TextEncoder``)."""

    @property
    def channels(self) -> int: ...

    def encode(self, prompts: list[str]) -> list[torch.Tensor]: ...


class InfinityEngine(ImageEngine):
    """In-process Infinity engine: ``add_request`` / ``step`` / ``generate``.

    ``text_encoder``: an object with ``encode(prompts) -> [T_i, C] tensors`` and ``channels``
    (default: ``engine.text.TextEncoder(config.text_encoder)``, loaded on the first prompt)."""

    def __init__(self, model: LoadedInfinity, config: EngineConfig | None = None,
                 text_encoder: PromptEncoder | Callable[[], PromptEncoder] | None = None) -> None:
        # ImageEngine.__init__ builds a VAR pool and runner; this builds Infinity's, then the shared state.
        self.model = model
        self.config = config = config or EngineConfig()
        spec = model.spec
        device = model.model.pos_start.device
        self.dtype = resolve_dtype(config.dtype, device)
        kv_dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        heads, head_dim = spec.model.num_heads, spec.model.head_dim
        if device.type == "cuda" and config.kv_pool_bytes is None:
            self.pool = KVPool.from_gpu_memory(config.gpu_memory_utilization, config.block_size, heads, head_dim,
                                               kv_dtype, device)
        else:
            nbytes = config.kv_pool_bytes or DEFAULT_CPU_POOL_BYTES
            self.pool = KVPool.from_bytes(nbytes, config.block_size, heads, head_dim, kv_dtype, device)
        self.manager = MemoryManager(self.pool)
        self.runner = InfinityRunner(model, self.pool, self.manager, self.dtype, config.attention_backend)
        self._init_bookkeeping()
        self._encoder = text_encoder
        self.text_seconds = 0.0  # prompt encoding time, over all requests

    # ----- model facts ------------------------------------------------------------------------
    def model_facts(self) -> dict:
        """What the scheduler validates job records against."""
        cfg = self.model.spec.model
        return {"kind": "infinity", "num_classes": None, "class_names": None,
                "num_scales": cfg.num_scales_for(cfg.default_resolution),
                "resolutions": [name for name, _ in cfg.resolutions], "default_resolution": cfg.default_resolution,
                "aspect_ratios": [r for r, _ in cfg.ratio_table()]}

    def text_encoder(self) -> PromptEncoder:
        if self._encoder is None:
            if not self.config.text_encoder:
                raise ValueError(f"prompt: model {self.model.spec.name!r} needs a text encoder: set text_encoder "
                                 "(--text-encoder DIR, a local directory with the saved encoder and tokenizer)")
            from .text import TextEncoder

            self._encoder = TextEncoder(self.config.text_encoder, device=self.runner.device,
                                        max_length=self.model.spec.model.text_maxlen)
        elif not hasattr(self._encoder, "encode"):
            self._encoder = self._encoder()  # a factory
        want = self.model.spec.model.text_channels
        if self._encoder.channels != want:
            raise ValueError(f"text_encoder: gives {self._encoder.channels} channels, model "
                             f"{self.model.spec.name!r} reads {want}")
        return self._encoder

    def _encode(self, text: str) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.text_encoder().encode([text])[0]
        self.text_seconds += time.perf_counter() - t0
        maxlen = self.model.spec.model.text_maxlen
        return out[:maxlen]

    # ----- plans ------------------------------------------------------------------------------
    def plan_for(self, policy: str, kv_budget: float, h_div_w: float = 1.0,
                 resolution: str | int | None = None) -> KVPlan:
        """The plan of a request's schedule (its snapped aspect ratio and resolution) under
        ``policy`` at ``kv_budget`` (``engine.infinity_plans.infinity_plan``, also what the
        scheduler sizes jobs with); cached per (policy, budget, ratio, number of scales)."""
        if policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {policy!r} (available: {', '.join(POLICIES)})")
        cfg = self.model.spec.model
        ratio = cfg.nearest_ratio(h_div_w)
        try:
            n = cfg.num_scales_for(resolution)
        except ValueError as e:
            raise ValueError(f"resolution: {str(e).removeprefix('resolution: ')}") from None
        key = (policy, float(kv_budget), ratio, n)
        if key not in self._plans:
            self._plans[key] = infinity_plan(self.model.spec.name, cfg, policy, kv_budget, ratio, n, self.config)
        return self._plans[key]

    # ----- requests ---------------------------------------------------------------------------
    def _validated(self, request: ImageRequest) -> ImageRequest:
        """The request re-checked under this model's rules (prompt required, no class label,
        a known resolution), with the model's sampling defaults filled in."""
        from pydantic import ValidationError

        spec = self.model.spec
        ctx = {"kind": "infinity", "resolutions": [name for name, _ in spec.model.resolutions]}
        try:
            ImageRequest.model_validate(request.model_dump(), context=ctx)
        except ValidationError as e:
            raise ValueError("; ".join(str(f) for f in field_errors(e))) from None
        return request.model_copy(update={
            "cfg": spec.default_cfg if request.cfg is None else request.cfg,
            "tau": spec.default_tau if request.tau is None else request.tau,
            "top_k": spec.default_top_k if request.top_k is None else request.top_k,
            "top_p": spec.default_top_p if request.top_p is None else request.top_p,
            "resolution": spec.model.default_resolution if request.resolution is None else request.resolution,
        })

    def add_request(self, request: ImageRequest) -> bool:
        """Queue a request; bad input or one that could never fit the pool is answered at once
        with an error result (returns False)."""
        cfg = self.model.spec.model
        try:
            req = self._validated(request)
            ratio = cfg.nearest_ratio(req.height_over_width)
            name = req.policy or self.config.policy
            plan = self.plan_for(name, self.config.kv_budget if req.kv_budget is None else req.kv_budget, ratio,
                                 req.resolution)
            policy = self.policy_for(name)
            self.manager.check_fits_pool(plan)
            text = self._encode(req.prompt)
            negative = None if req.negative_prompt is None else self._encode(req.negative_prompt)
        except (ValueError, RequestTooLargeError) as e:
            self._finished.append(_error_result(request, str(e)))
            return False
        self.waiting.append(InfinityRequestState(
            request=req,
            seqs=(next(self._seq_ids), next(self._seq_ids)),
            plan=plan,
            policy=policy,
            generator=make_generator(req.seed),
            h_div_w=ratio,
            schedule=cfg.schedule(ratio, req.resolution),
            rope_grid=cfg.full_schedule(ratio)[-1],
            text=text,
            negative_text=negative,
            t_arrival=time.perf_counter(),
        ))
        return True

    # ----- the loop ---------------------------------------------------------------------------
    def _admit(self) -> None:
        before = len(self.running)
        super()._admit()
        admitted = self.running[before:]
        if admitted:
            try:
                self.runner.prepare(admitted)
            except Exception as e:  # e.g. a text the model cannot read: fail those, keep serving
                for st in admitted:
                    self.running.remove(st)
                    self._release(st)
                    self._finished.append(_error_result(st.request, f"prompt: cannot condition on it: "
                                                                    f"{type(e).__name__}: {e}"))

    def _step_tokens_of(self, st: InfinityRequestState, scale: int) -> int:
        return 2 * st.lengths[scale]

    def _is_done(self, st: InfinityRequestState) -> bool:
        return st.scale == st.num_scales

    def _release(self, st: InfinityRequestState) -> dict:
        self.runner.release(st)
        return super()._release(st)

    def _finish(self, done: list[InfinityRequestState]) -> None:
        images = self.runner.decode(done)
        spec = self.model.spec
        for i, st in enumerate(done):
            req = st.request
            tokens = torch.cat([pack_bits(t) for t in st.tokens]).tolist()
            extra = {"h_div_w": st.h_div_w, "resolution": req.resolution,
                     "schedule": [list(hw) for hw in st.schedule],
                     "image_size": list(spec.image_size(st.h_div_w, req.resolution)),
                     "token_bits": spec.model.token_bits, "text_tokens": int(st.text.shape[0]),
                     "text_condition_bytes": st.cond_bytes}  # before release drops the condition
            self._finished.append(self._result_of(st, tokens, images[i].numpy(), prompt=req.prompt, stats=extra))
