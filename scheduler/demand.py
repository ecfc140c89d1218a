"""KV page demand of a (policy, kv_budget) pair, computed by the scheduler itself.

The same plan and page math a worker's engine applies at admission (``ImageEngine.plan_for``
and ``MemoryManager.request_pages``: the plan's peak pages for each of a request's two
sequences, conditional and unconditional), from the model spec, the engine config and the
scale profile, so sizing a job never waits on a busy worker. ``tests/test_cluster_units.py``
checks it against the engine for every policy. Results are cached in a bounded LRU: a job with
300 distinct budgets costs 300 small computations, and an unknown policy none at all.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from engine.config import EngineConfig
from engine.models.catalog import INFINITY_MODELS, get_infinity_spec, get_spec

CACHE_SIZE = 256


class DemandCalculator:
    def __init__(self, model: str, engine: EngineConfig) -> None:
        self.infinity = model in INFINITY_MODELS
        self.spec = get_infinity_spec(model) if self.infinity else get_spec(model)
        self.engine = engine
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._profile = None

    def _profile_for(self):
        from engine.models.registry import shipped_profile_path
        from memory.profile import ScaleProfile

        if self._profile is None:
            spec, c = self.spec, self.engine
            path = Path(c.profile_path) if c.profile_path else shipped_profile_path(spec.name)
            if not path.exists():
                where = f"profile_path {path} does not exist" if c.profile_path else \
                    f"model {spec.name!r} ships no scale profile ({path})"
                raise ValueError(f"policies that split budgets by scale role (scalekv, scalekv-allq) need a scale "
                                 f"profile: {where}")
            self._profile = ScaleProfile.load(path, spec.name, spec.var.patch_nums, spec.var.depth)
        return self._profile

    def demand(self, policy: str | None, kv_budget: float | None, block_size: int, num_pages: int,
               h_div_w: float | None = None, resolution: str | int | None = None) -> dict:
        """``{"pages": n}``, or ``{"error": "field: why", "field": field}`` for a request no
        worker can run (unknown policy, a budget the policy refuses, larger than the pool).
        Text-to-image models: the demand depends on the request's aspect ratio and resolution
        (its schedule), as in ``InfinityEngine.plan_for``."""
        if self.infinity:
            return self._infinity_demand(policy, kv_budget, block_size, num_pages, h_div_w, resolution)
        from memory.budgets import budget_plan
        from memory.policy_names import POLICIES, needs_profile

        c = self.engine
        policy = c.policy if policy is None else policy
        kv_budget = c.kv_budget if kv_budget is None else kv_budget
        if policy not in POLICIES:  # never cached: unknown names are unbounded
            return {"error": f"policy: unknown policy {policy!r} (available: {', '.join(POLICIES)})", "field": "policy"}
        key = (policy, float(kv_budget), block_size, num_pages)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            settings = c.budget_settings(kv_budget)
            profile = self._profile_for() if needs_profile(policy) else None
            plan = budget_plan(policy, self.spec.var.patch_nums, self.spec.var.depth, settings, profile)
            pages = plan.peak_pages(block_size) * 2
        except ValueError as e:
            msg = str(e)
            head = msg.split(":", 1)[0]
            field = head if head in ("policy", "kv_budget") else "policy"
            out = {"error": msg if msg.startswith(f"{field}:") else f"{field}: {msg}", "field": field}
        else:
            if pages > num_pages:
                out = {"error": f"kv_budget: request needs {pages} KV pages (policy {policy!r}) but the largest "
                                f"worker pool has {num_pages} pages: lower kv_budget", "field": "kv_budget"}
            else:
                out = {"pages": int(pages), "policy": policy, "kv_budget": kv_budget}
        self._cache[key] = out
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def _infinity_demand(self, policy: str | None, kv_budget: float | None, block_size: int, num_pages: int,
                         h_div_w: float | None, resolution: str | int | None) -> dict:
        """The plan ``InfinityEngine.plan_for`` reserves (the same function,
        ``engine.infinity_plans.infinity_plan``), for the request's schedule."""
        from engine.infinity_plans import infinity_plan
        from memory.policy_names import POLICIES

        c = self.engine
        policy = c.policy if policy is None else policy
        kv_budget = c.kv_budget if kv_budget is None else kv_budget
        if policy not in POLICIES:  # never cached: unknown names are unbounded
            return {"error": f"policy: unknown policy {policy!r} (available: {', '.join(POLICIES)})", "field": "policy"}
        cfg = self.spec.model
        ratio = cfg.nearest_ratio(1.0 if h_div_w is None else h_div_w)
        try:
            n = cfg.num_scales_for(resolution)
        except ValueError as e:
            return {"error": f"resolution: {str(e).removeprefix('resolution: ')}", "field": "resolution"}
        key = ("infinity", policy, float(kv_budget), ratio, n, block_size, num_pages)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            plan = infinity_plan(self.spec.name, cfg, policy, kv_budget, ratio, n, c)
            pages = plan.peak_pages(block_size) * 2
        except ValueError as e:
            msg = str(e)
            head = msg.split(":", 1)[0]
            field = head if head in ("policy", "kv_budget") else "policy"
            hit = {"error": msg if msg.startswith(f"{field}:") else f"{field}: {msg}", "field": field}
        else:
            shown = 1.0 if policy == "full" else kv_budget
            if pages <= num_pages:
                hit = {"pages": int(pages), "policy": policy, "kv_budget": shown}
            else:
                what = "resolution" if policy == "full" else "kv_budget"
                hit = {"error": f"{what}: request needs {pages} KV pages (policy {policy!r}) but the largest worker "
                                f"pool has {num_pages}", "field": what}
        self._cache[key] = hit
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return hit
