"""KV plans of Infinity requests: one function for the engine (``InfinityEngine.plan_for``) and
the scheduler's page demand (``scheduler.demand``), so both size a request the same way.

A request's schedule (its grids (h, w), from its snapped aspect ratio and resolution) is the
plan's scale schedule: ``full`` keeps every finished scale; the compressing policies split
``kv_budget`` with ``memory.budgets.budget_plan`` over that schedule. ``scalekv`` needs a scale
profile measured on that very schedule (``engine.calibrate.calibrate_infinity``), read from
``EngineConfig.profile_path``; a request whose schedule has no profile is refused.
"""

from __future__ import annotations

from pathlib import Path

from memory.budgets import budget_plan
from memory.manager import KVPlan, full_plan
from memory.policy_names import POLICIES, needs_profile
from memory.profile import ScaleProfile

from .config import EngineConfig


def infinity_profile(model_name: str, schedule: tuple[tuple[int, int], ...], depth: int,
                     config: EngineConfig) -> ScaleProfile:
    """The scale profile of ``schedule`` from ``config.profile_path`` (checked: model, schedule,
    depth), or a ``policy:`` error naming profile_path."""
    hint = (f"run calibration on {model_name!r} for this aspect ratio and resolution "
            "(engine.calibrate.calibrate_infinity) and pass it as profile_path")
    if not config.profile_path:
        raise ValueError(f"policy: scalekv on Infinity needs a scale profile of the request's schedule "
                         f"{[list(hw) for hw in schedule]}: profile_path is not set; {hint}")
    path = Path(config.profile_path)
    if not path.exists():
        raise ValueError(f"policy: profile_path {path} does not exist; {hint}")
    prof = ScaleProfile.load(path)
    if prof.model != model_name or prof.depth != depth or tuple(prof.patch_nums) != tuple(schedule):
        raise ValueError(f"policy: profile_path {path} was measured on {prof.model!r} with schedule "
                         f"{[p if isinstance(p, int) else list(p) for p in prof.patch_nums]}, the request runs "
                         f"{model_name!r} with schedule {[list(hw) for hw in schedule]}: scalekv serves only "
                         f"the schedule its profile was calibrated on; {hint}")
    return prof


def infinity_plan(model_name: str, model_cfg, policy: str, kv_budget: float, ratio: float, num_scales: int,
                  config: EngineConfig) -> KVPlan:
    """The plan of one Infinity request (``ratio``: a snapped template; ``num_scales`` from its
    resolution). Errors are ``ValueError``s starting with the field (``policy:`` / ``kv_budget:``)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: unknown policy {policy!r} (available: {', '.join(POLICIES)})")
    schedule = tuple(model_cfg.schedule(ratio, num_scales))
    depth = model_cfg.depth
    if policy == "full":
        return full_plan([h * w for h, w in schedule], depth)
    settings = config.budget_settings(kv_budget)
    profile = infinity_profile(model_name, schedule, depth, config) \
        if needs_profile(policy) and kv_budget < 1.0 else None
    return budget_plan(policy, schedule, depth, settings, profile)
