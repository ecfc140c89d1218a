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
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from memory.budgets import BudgetSettings, budget_plan
from memory.manager import KVPlan, MemoryManager, RequestTooLargeError
from memory.policies import SelectionPolicy, make_policy
from memory.policy_names import POLICIES, needs_profile
from memory.pool import KVPool
from memory.profile import ScaleProfile

from .config import DEFAULT_CPU_POOL_BYTES, EngineConfig
from .models.registry import LoadedModel, shipped_profile_path
from .precision import resolve_dtype
from .reference import image_to_uint8
from .request import REQUEST_FIELDS, ImageRequest, ImageResult, resolve_class
from .runner import ModelRunner, RequestState
from .sampling import make_generator


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
        if device.type == "cuda" and config.kv_pool_bytes is None:
            self.pool = KVPool.from_gpu_memory(config.gpu_memory_utilization, config.block_size, heads, head_dim,
                                               kv_dtype, device)
        else:
            nbytes = config.kv_pool_bytes or DEFAULT_CPU_POOL_BYTES
            self.pool = KVPool.from_bytes(nbytes, config.block_size, heads, head_dim, kv_dtype, device)
        self.manager = MemoryManager(self.pool)
        backend = config.attention_backend
        self.runner = ModelRunner(model, self.pool, self.manager, self.dtype, backend)
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self._finished: list[ImageResult] = []
        self._seq_ids = itertools.count()
        self._plans: dict[tuple[str, float], KVPlan] = {}
        self._policies: dict[str, SelectionPolicy] = {}
        self._profile: ScaleProfile | None = None
        self.num_steps = 0
        self.num_preemptions = 0  # exact reservation: stays 0, kept for telemetry parity

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
        c = self.config
        return BudgetSettings(kv_budget=kv_budget, window_size=c.window_size, delta=c.budget_delta,
                              align=c.block_size, drafter_mode=c.drafter_mode, num_drafters=c.num_drafters)

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
        lengths = self.model.spec.var.scale_lengths()
        for st in self.running:
            need = 2 * lengths[st.scale]
            if batch and tokens + need > self.config.max_batch_tokens:
                continue
            batch.append(st)
            tokens += need
        return batch

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
                done = []
                for st in batch:
                    if st.t_first_scale is None:
                        st.t_first_scale = now
                    self.manager.note_tokens_peak(self._key(st))
                    if st.scale == self.model.spec.var.num_scales:
                        done.append(st)
                if done:
                    self._finish(done)
        out, self._finished = self._finished, []
        return out

    def _finish(self, done: list[RequestState]) -> None:
        images = image_to_uint8(self.runner.decode(done))
        now = time.perf_counter()
        spec = self.model.spec
        for i, st in enumerate(done):
            self.running.remove(st)
            acct = self._release(st)
            scratch = 2 * spec.var.scale_lengths()[-1] * 2 * spec.var.width * self.pool.kv.element_size()
            req = st.request
            self._finished.append(ImageResult(
                request_id=req.request_id,
                class_label=req.class_label,
                seed=req.seed,
                job_id=req.job_id,
                tokens=torch.cat(st.tokens).tolist(),
                image=images[i].numpy(),
                kv_peak_bytes=acct.get("kv_peak_bytes", 0) + scratch,
                seconds=now - st.t_arrival,
                stats={
                    "queue_seconds": round(st.t_admitted - st.t_arrival, 6),
                    "first_scale_seconds": round(st.t_first_scale - st.t_arrival, 6),
                    "pages_reserved": acct.get("pages_reserved", 0),
                    "pages_peak": acct.get("pages_peak", 0),
                    "tokens_peak": acct.get("tokens_peak", 0),
                    "policy": st.plan.name,
                    "kv_budget": self.config.kv_budget if req.kv_budget is None else req.kv_budget,
                },
            ))

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

    def stats(self) -> dict:
        return {
            **self.manager.stats(),
            **self.role_pages(),
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
        }


def _error_result(request: ImageRequest, message: str) -> ImageResult:
    """A request answered with an error; ``fields`` names the request field when the message
    starts with one (``kv_budget: ...``)."""
    head = message.split(":", 1)[0]
    return ImageResult(request.request_id, request.class_label, request.seed, job_id=request.job_id,
                       error=message, fields=(head,) if head in REQUEST_FIELDS else ())
