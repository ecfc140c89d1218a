"""``ImageEngine``: the in-process engine (pool + memory manager + runner + step loop).

Requests are admitted in arrival order when the memory manager can reserve their peak pages
(exact reservation: a VAR request's needs are known up front, so an admitted request never
runs out of memory and a waiting one never crashes the pool). Each ``step()`` advances a batch
of running requests by one scale, whatever scale each is at (iteration-level batching), under
``max_batch_tokens`` and ``max_running``.

Every request names a KV policy and a ``kv_budget`` (or takes the engine's). ``plan_for`` turns
them into a ``KVPlan`` of per-(scale, layer) token quotas (``memory.budgets``), which is what
admission reserves; ``policy_for`` gives the selection policy (``memory.policies``) that the
runner asks which tokens to keep. ``scalekv`` also needs the model's scale profile: the shipped
``engine/models/weights/<model>/scale_profile.json`` or ``EngineConfig.profile_path``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from memory.budgets import BudgetSettings, budget_plan
from memory.manager import KVPlan, MemoryManager, RequestTooLargeError, full_plan
from memory.policies import SelectionPolicy, make_policy
from memory.policy_names import POLICIES, needs_profile
from memory.pool import KVPool
from memory.profile import ScaleProfile

from .config import DEFAULT_CPU_POOL_BYTES, EngineConfig
from .host_memory import tune_host_malloc
from .models.registry import LoadedModel, shipped_profile_path
from .precision import resolve_dtype
from .reference import image_to_uint8
from .request import REQUEST_FIELDS, ImageRequest, ImageResult, resolve_class
from .runner import ModelRunner, RequestState
from .sampling import make_generator

log = logging.getLogger(__name__)


def _cuda_pool(config: EngineConfig, var, kv_dtype: torch.dtype, device: torch.device) -> KVPool:
    """The CUDA pool: what ``max_running`` requests need at the peak of the full cache (the
    largest any policy reserves), capped by ``gpu_memory_utilization`` of the free memory."""
    heads, head_dim = var.num_heads, var.head_dim
    page = KVPool.bytes_per_page(config.block_size, heads, head_dim, kv_dtype)
    per_request = 2 * full_plan(var.scale_lengths(), var.depth).peak_pages(config.block_size)
    need = config.max_running * per_request * page
    free, _total = torch.cuda.mem_get_info(device)
    cap = int(free * config.gpu_memory_utilization)
    nbytes = min(need, cap)
    log.info("KV pool: %.1f MiB (%d requests x %d pages x %d B = %.1f MiB needed; cap %.2f x %.1f MiB free)",
             nbytes / 2**20, config.max_running, per_request, page, need / 2**20, config.gpu_memory_utilization,
             free / 2**20)
    return KVPool.from_bytes(nbytes, config.block_size, heads, head_dim, kv_dtype, device)


@dataclass
class Preview:
    """A running request's image so far: the accumulated feature map after scale ``scale``
    (0-based) decoded to uint8 ``[H, W, 3]``. Only for requests with ``preview_every``."""

    request_id: str
    job_id: str | None
    scale: int
    image: object  # np.ndarray

    @property
    def key(self) -> str:
        return f"{self.job_id}/{self.request_id}" if self.job_id else self.request_id


class ImageEngine:
    """In-process engine: ``add_request`` / ``step`` / ``generate``."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        spec = model.spec
        device = next(model.var.parameters()).device
        self.dtype = resolve_dtype(config.dtype, device)  # "auto" -> what this hardware runs fast
        kv_dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        heads, head_dim = spec.var.num_heads, spec.var.head_dim
        if config.host_malloc == "tuned" and device.type == "cpu":
            tune_host_malloc()
        if device.type == "cuda" and config.kv_pool_bytes is None:
            self.pool = _cuda_pool(config, spec.var, kv_dtype, device)
        else:
            nbytes = config.kv_pool_bytes or DEFAULT_CPU_POOL_BYTES
            self.pool = KVPool.from_bytes(nbytes, config.block_size, heads, head_dim, kv_dtype, device)
        self.manager = MemoryManager(self.pool)
        backend = config.attention_backend
        self.runner = ModelRunner(model, self.pool, self.manager, self.dtype, backend)
        self._init_bookkeeping()

    def _init_bookkeeping(self) -> None:
        """Queues, caches and counters: the same for every model family (an engine subclass that
        builds its own pool and runner calls this too)."""
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self._finished: list[ImageResult] = []
        self._seq_ids = itertools.count()
        self._plans: dict[tuple, KVPlan] = {}
        self._policies: dict[str, SelectionPolicy] = {}
        self._profile: ScaleProfile | None = None
        self.num_steps = 0
        self.num_preemptions = 0  # exact reservation: stays 0, kept for telemetry parity
        self._previews: list[Preview] = []
        self.num_previews = 0
        self.preview_seconds = 0.0  # time spent decoding previews (their whole cost)

    # ----- requests -----------------------------------------------------------------------
    def scale_profile(self) -> ScaleProfile:
        """The model's scale profile (``EngineConfig.profile_path`` or the shipped one), checked
        against the model's name, scale schedule and depth."""
        if self._profile is None:
            spec = self.model.spec
            path = Path(self.config.profile_path) if self.config.profile_path else shipped_profile_path(spec.name)
            if not path.exists():
                where = f"profile_path {path} does not exist" if self.config.profile_path else \
                    f"model {spec.name!r} ships no scale profile ({path})"
                raise ValueError(
                    f"policies that split budgets by scale role (scalekv, scalekv-allq) need a scale profile: {where}; "
                    f"run `scalekv calibrate --model {spec.name} --out PROFILE.json` and pass --profile-path "
                    "PROFILE.json (EngineConfig.profile_path)"
                )
            self._profile = ScaleProfile.load(path, spec.name, spec.var.patch_nums, spec.var.depth)
        return self._profile

    def budget_settings(self, kv_budget: float) -> BudgetSettings:
        return self.config.budget_settings(kv_budget)

    def plan_for(self, policy: str, kv_budget: float) -> KVPlan:
        """Per-(scale, layer) token quotas of ``policy`` at ``kv_budget`` (cached)."""
        key = (policy, float(kv_budget))
        if key not in self._plans:
            if policy not in POLICIES:
                raise ValueError(f"policy: unknown policy {policy!r} (available: {', '.join(POLICIES)})")
            var = self.model.spec.var
            profile = self.scale_profile() if needs_profile(policy) else None
            self._plans[key] = budget_plan(policy, var.patch_nums, var.depth, self.budget_settings(kv_budget),
                                           profile)
        return self._plans[key]

    def policy_for(self, policy: str) -> SelectionPolicy:
        """The engine's selection policy object of that name (stateful ones track sequences)."""
        if policy not in self._policies:
            c = self.config
            self._policies[policy] = make_policy(policy, c.window_size, c.pool_kernel, c.pooling, c.score_queries,
                                                 c.score)
        return self._policies[policy]

    def add_request(self, request: ImageRequest) -> bool:
        """Queue a request. Bad input or a request that could never fit the pool is answered at
        once with an error result (see ``step``); returns False in that case."""
        spec = self.model.spec
        try:
            if request.prompt is not None or request.class_label is None:
                raise ValueError(f"{'prompt' if request.prompt is not None else 'class_label'}: model "
                                 f"{spec.name!r} is class-conditional: give a class_label, not a prompt")
            try:
                label = resolve_class(request.class_label, spec.class_names, spec.var.num_classes)
            except ValueError as e:
                raise ValueError(f"class_label: {e}") from None
            req = request.model_copy(update={"class_label": label}).resolved(
                spec.default_cfg, spec.default_top_k, spec.default_top_p)
            name = req.policy or self.config.policy
            plan = self.plan_for(name, self.config.kv_budget if req.kv_budget is None else req.kv_budget)
            policy = self.policy_for(name)
            self.manager.check_fits_pool(plan)
        except (ValueError, RequestTooLargeError) as e:
            self._finished.append(_error_result(request, str(e)))
            return False
        device = self.runner.device
        full = spec.vae.patch_nums[-1]
        state = RequestState(
            request=req,
            seqs=(next(self._seq_ids), next(self._seq_ids)),
            plan=plan,
            policy=policy,
            generator=make_generator(req.seed),
            f_hat=torch.zeros(1, spec.vae.z_channels, full, full, device=device),
            t_arrival=time.perf_counter(),
        )
        self.waiting.append(state)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ----- the loop -------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_running:
            st = self.waiting[0]
            if not self.manager.try_reserve(self._key(st), st.seqs, st.plan):
                break  # FIFO: wait for pages rather than starve the head of the queue
            self.waiting.popleft()
            st.t_admitted = time.perf_counter()
            self.running.append(st)

    def _schedule(self) -> list[RequestState]:
        batch, tokens = [], 0
        for st in self.running:
            need = self._step_tokens(st)
            if batch and tokens + need > self.config.max_batch_tokens:
                continue
            batch.append(st)
            tokens += need
        return batch

    def _step_tokens(self, st: RequestState) -> int:
        """Tokens a request adds to the next step (both CFG branches)."""
        return self._step_tokens_of(st, st.scale)

    def _is_done(self, st: RequestState) -> bool:
        return st.scale == self.model.spec.var.num_scales

    def _key(self, st: RequestState) -> str:
        """Reservation key: the engine's own sequence ids, unique even when callers reuse a
        request_id (two jobs on one worker may both name a request "r0")."""
        return f"seq{st.seqs[0]}"

    def _release(self, st: RequestState) -> dict:
        """Return the request's pages and drop any policy state of its sequences."""
        if st.policy is not None:
            for seq in st.seqs:
                st.policy.release(seq)
        return self.manager.release(self._key(st))

    def step(self) -> list[ImageResult]:
        """Admit what fits, run one scale for a batch of running requests, and return the
        results that finished (including error results of rejected requests)."""
        self._admit()
        batch = self._schedule()
        if batch:
            for st in batch:
                self.manager.begin_step(self._key(st))
            try:
                self.runner.step(batch)
            except Exception as e:  # the step broke: fail its requests, keep the engine serving
                for st in batch:
                    self.running.remove(st)
                    self._release(st)
                    self._finished.append(_error_result(st.request, f"engine step failed: {type(e).__name__}: {e}"))
            else:
                self.num_steps += 1
                now = time.perf_counter()
                done, previews = [], []
                for st in batch:
                    if st.t_first_scale is None:
                        st.t_first_scale = now
                    self.manager.note_tokens_peak(self._key(st))
                    self.manager.end_step(self._key(st), self._scratch_bytes(st))
                    if self._is_done(st):
                        done.append(st)
                    elif st.request.preview_every and st.scale % st.request.preview_every == 0:
                        previews.append(st)
                if previews:
                    self._preview(previews)
                if done:
                    self._finish(done)
        out, self._finished = self._finished, []
        return out

    def _scratch_bytes(self, st: RequestState) -> int:
        """K and V of one layer for the tokens of the step just run (both CFG sequences): they
        exist outside the pool while a layer attends (the scratch the true per-step peak counts)."""
        heads, head_dim = self.pool.kv.shape[-2:]
        return self._step_tokens_of(st, st.scale - 1) * 2 * heads * head_dim * self.pool.kv.element_size()

    def _step_tokens_of(self, st: RequestState, scale: int) -> int:
        """Tokens of both CFG sequences at ``scale``."""
        return 2 * self.model.spec.var.scale_lengths()[scale]

    def _finish(self, done: list[RequestState]) -> None:
        images = image_to_uint8(self.runner.decode(done))
        for i, st in enumerate(done):
            self._finished.append(self._result_of(st, torch.cat(st.tokens).tolist(), images[i].numpy()))

    def _result_of(self, st: RequestState, tokens: list[int], image, **fields) -> ImageResult:
        """A finished request's result: releases its pages (their accounting goes into the
        result); ``fields`` adds result fields, ``fields["stats"]`` more stats."""
        self.running.remove(st)
        acct = self._release(st)
        req, now = st.request, time.perf_counter()
        stats = {
            "queue_seconds": round(st.t_admitted - st.t_arrival, 6),
            "first_scale_seconds": round(st.t_first_scale - st.t_arrival, 6),
            "pages_reserved": acct.get("pages_reserved", 0),
            "pages_peak": acct.get("pages_peak", 0),
            "tokens_peak": acct.get("tokens_peak", 0),
            "policy": st.plan.name,
            "kv_budget": self.config.kv_budget if req.kv_budget is None else req.kv_budget,
            **fields.pop("stats", {}),
        }
        return ImageResult(request_id=req.request_id, class_label=req.class_label, seed=req.seed, job_id=req.job_id,
                           tokens=tokens, image=image, kv_peak_bytes=acct.get("kv_peak_bytes", 0),
                           seconds=now - st.t_arrival, stats=stats, **fields)

    def _preview(self, states: list[RequestState]) -> None:
        """Decode the accumulated feature maps of ``states`` (one batched decoder pass): an
        extra decode per preview, which is what previews cost; off unless a request asks."""
        t0 = time.perf_counter()
        images = image_to_uint8(self.runner.decode(states))
        for i, st in enumerate(states):
            req = st.request
            self._previews.append(Preview(req.request_id, req.job_id, st.scale - 1, images[i].numpy()))
        self.num_previews += len(states)
        self.preview_seconds += time.perf_counter() - t0

    def take_previews(self) -> list[Preview]:
        """Previews decoded since the last call (running requests with ``preview_every``)."""
        out, self._previews = self._previews, []
        return out

    def abort_all(self, reason: str = "aborted") -> list[ImageResult]:
        """Fail every queued and running request and return all their pages."""
        out = []
        for st in list(self.waiting) + list(self.running):
            self._release(st)
            out.append(_error_result(st.request, reason))
        self.waiting.clear()
        self.running.clear()
        return out

    def abort(self, request_key: str, reason: str = "cancelled") -> tuple[ImageResult, int] | None:
        """Fail one queued or running request (``ImageRequest.key``: job/request id, or the
        request id in-process) and return its pages now. Returns (its error result, pages it
        had reserved: 0 while it waited), or None if no such request is waiting or running."""
        for queue in (self.waiting, self.running):
            for st in list(queue):
                if st.request.key == request_key:
                    queue.remove(st)
                    acct = self._release(st)  # idempotent: a waiting request holds no reservation
                    self._previews = [p for p in self._previews if p.key != request_key]
                    return _error_result(st.request, reason), int(acct.get("pages_reserved", 0))
        return None

    def generate_stream(self, requests: Iterable[ImageRequest]) -> Iterator[ImageResult]:
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            yield from self.step()

    def generate(self, requests: Iterable[ImageRequest]) -> list[ImageResult]:
        """All results, in the order the requests were given."""
        requests = list(requests)
        by_id: dict[str, list[ImageResult]] = {}
        for r in self.generate_stream(requests):
            by_id.setdefault(r.request_id, []).append(r)
        return [by_id[r.request_id].pop(0) for r in requests]

    def role_pages(self) -> dict[str, int]:
        """Pages held right now by drafter layers vs the other (refiner) layers, over running
        requests. A layer's role is its plan's role for the cache it holds (kept after the
        request's last finished scale); plans without drafters count as refiners."""
        drafter = refiner = 0
        table = self.manager.table
        for st in self.running:
            roles = set(st.plan.drafters[st.scale - 1]) if 0 < st.scale <= len(st.plan.drafters) else set()
            for seq in st.seqs:
                for layer in table.layers(seq):
                    n = table.num_pages(seq, layer)
                    if layer in roles:
                        drafter += n
                    else:
                        refiner += n
        return {"drafter_pages": drafter, "refiner_pages": refiner}

    def model_facts(self) -> dict:
        """What the scheduler validates job records against (``validate_records``)."""
        spec = self.model.spec
        return {"kind": "var", "num_classes": spec.var.num_classes,
                "class_names": list(spec.class_names) if spec.class_names else None,
                "num_scales": spec.var.num_scales, "resolutions": None}

    def stats(self) -> dict:
        return {
            **self.manager.stats(),
            **self.role_pages(),
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "num_previews": self.num_previews,
            "preview_seconds": round(self.preview_seconds, 6),
        }


def make_engine(model, config: EngineConfig | None = None, **kw) -> ImageEngine:
    """The engine for a loaded model of either family (``build_model``'s result): an
    ``ImageEngine`` for VAR, an ``InfinityEngine`` for Infinity (``kw``: its ``text_encoder``)."""
    from .models.registry import LoadedInfinity

    if isinstance(model, LoadedInfinity):
        from .infinity_engine import InfinityEngine

        return InfinityEngine(model, config, **kw)
    return ImageEngine(model, config, **kw)


def _error_result(request: ImageRequest, message: str) -> ImageResult:
    """A request answered with an error; ``fields`` names the request field when the message
    starts with one (``kv_budget: ...``)."""
    head = message.split(":", 1)[0]
    return ImageResult(request.request_id, request.class_label, request.seed, job_id=request.job_id,
                       error=message, fields=(head,) if head in REQUEST_FIELDS else (), prompt=request.prompt)
