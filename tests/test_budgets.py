"""Budgets: exact totals at every compressed scale, whole leading scales, feasible quotas."""

from __future__ import annotations

import pytest

from engine.models.registry import get_spec
from memory.budgets import (
    BudgetSettings,
    LayerwisePlan,
    budget_plan,
    check_plan,
    compressed_scales,
    cumulative_lengths,
    uniform_tokens,
    water_fill,
)
from memory.manager import KVPlan, full_plan
from memory.policies import POLICIES
from memory.profile import ScaleProfile

TINY = get_spec("var-tiny").var
MICRO = get_spec("var-micro").var
D16 = get_spec("var-d16").var


def _profile(cfg, drafters_per_scale) -> ScaleProfile:
    """A synthetic profile: ``drafters_per_scale(si)`` -> layers, scale 0 empty."""
    rows = tuple(() if si == 0 else tuple(sorted(set(drafters_per_scale(si)))) for si in range(cfg.num_scales))
    return ScaleProfile(model="x", patch_nums=tuple(cfg.patch_nums), depth=cfg.depth, drafters=rows)


PROFILES = {
    "one-moving": lambda cfg: _profile(cfg, lambda si: [si % cfg.depth]),
    "first-two": lambda cfg: _profile(cfg, lambda si: [0, 1]),
    "half": lambda cfg: _profile(cfg, lambda si: range(0, cfg.depth, 2)),
    "none": lambda cfg: _profile(cfg, lambda si: []),
}


def test_water_fill_is_exact_equal_and_capped():
    assert water_fill(10, [5, 5, 5]) == [4, 3, 3]
    assert water_fill(10, [1, 100, 100]) == [1, 5, 4]
    assert water_fill(0, [3, 3]) == [0, 0]
    assert water_fill(6, [3, 3]) == [3, 3]
    aligned = water_fill(100, [64, 64, 64, 64], align=16)
    assert sum(aligned) == 100 and all(a <= 64 for a in aligned)
    assert sum(-(-a // 16) for a in aligned) == -(-100 // 16)  # only one partial page
    with pytest.raises(ValueError, match="cannot place"):
        water_fill(11, [5, 5])


@pytest.mark.parametrize("cfg", [TINY, MICRO, D16], ids=["tiny", "micro", "d16"])
@pytest.mark.parametrize("budget", [0.02, 0.1, 0.2, 0.4, 0.75])
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("align", [1, 16])
def test_every_policy_hits_the_target_at_every_compressed_scale(cfg, budget, profile, align):
    prof = PROFILES[profile](cfg)
    u = uniform_tokens(cfg.patch_nums, budget)
    cum = cumulative_lengths(cfg.patch_nums)
    comp = compressed_scales(cfg.patch_nums, budget)
    assert comp == [si for si in range(cfg.num_scales - 1) if cum[si] > u]
    for delta in (None, 0.0, 7.0):
        settings = BudgetSettings(kv_budget=budget, window_size=16, align=align, delta=delta)
        for policy in POLICIES:
            plan = budget_plan(policy, cfg.patch_nums, cfg.depth, settings, prof)
            check_plan(plan, cfg.patch_nums)
            assert plan.name == policy
            for si in range(cfg.num_scales - 1):
                if policy == "full":
                    assert plan.kept[si] == (cum[si],) * cfg.depth
                elif si in comp:
                    assert sum(plan.kept[si]) == cfg.depth * u, (policy, si)
                else:  # leading scales stay whole
                    assert plan.kept[si] == (cum[si],) * cfg.depth


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_is_the_full_plan(policy):
    prof = PROFILES["first-two"](TINY)
    plan = budget_plan(policy, TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=1.0), prof)
    assert plan.kept == full_plan(TINY.scale_lengths(), TINY.depth).kept


def test_uniform_baselines_keep_exactly_u_per_layer():
    settings = BudgetSettings(kv_budget=0.1, align=16)
    u = uniform_tokens(TINY.patch_nums, 0.1)
    for policy in ("sliding", "streaming", "h2o", "snapkv"):
        plan = budget_plan(policy, TINY.patch_nums, TINY.depth, settings)
        for si in compressed_scales(TINY.patch_nums, 0.1):
            assert plan.kept[si] == (u,) * TINY.depth


def test_scalekv_drafters_keep_all_they_hold_when_it_fits():
    prof = PROFILES["first-two"](D16)  # depth 16: room for two drafters at 10%
    plan = budget_plan("scalekv", D16.patch_nums, D16.depth, BudgetSettings(kv_budget=0.2), prof)
    lengths = D16.scale_lengths()
    u = uniform_tokens(D16.patch_nums, 0.2)
    comp = compressed_scales(D16.patch_nums, 0.2)
    for si in comp:
        for la in (0, 1):
            assert plan.kept[si][la] == plan.history(si, la) + lengths[si]  # nothing evicted
        refiners = plan.kept[si][2:]
        assert max(refiners) - min(refiners) <= 1 and max(refiners) <= u  # equal share of the rest
        assert plan.drafters[si] == (0, 1)
    assert plan.drafters[comp[0] - 1] == ()


def test_scalekv_delta_decays_the_refiner_budget_linearly():
    prof = PROFILES["first-two"](D16)
    u = uniform_tokens(D16.patch_nums, 0.4)
    comp = compressed_scales(D16.patch_nums, 0.4)
    uniform = budget_plan("scalekv", D16.patch_nums, D16.depth, BudgetSettings(kv_budget=0.4, delta=0.0), prof)
    assert all(uniform.kept[si] == (u,) * D16.depth for si in comp)
    plan = budget_plan("scalekv", D16.patch_nums, D16.depth, BudgetSettings(kv_budget=0.4, delta=10.0), prof)
    for j, si in enumerate(comp):
        assert plan.kept[si][5] == u - 10 * j
        assert plan.kept[si][0] >= u


def test_pyramid_budgets_decrease_with_depth():
    plan = budget_plan("pyramidkv", D16.patch_nums, D16.depth, BudgetSettings(kv_budget=0.1))
    last = compressed_scales(D16.patch_nums, 0.1)[-1]
    row = plan.kept[last]
    assert all(a >= b for a, b in zip(row, row[1:])) and row[0] > row[-1]


def test_layerwise_peak_is_tighter_and_equal_for_full():
    prof = PROFILES["one-moving"](TINY)
    for budget in (0.1, 0.2):
        plan = budget_plan("scalekv", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=budget), prof)
        assert isinstance(plan, LayerwisePlan)
        simultaneous = KVPlan(plan.name, plan.kept).peak_pages(16)
        assert plan.peak_pages(16) <= simultaneous
        final = sum(-(-k // 16) for k in plan.kept[-2])
        assert plan.peak_pages(16) >= final  # the cache held while the last scale runs
    full = budget_plan("full", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=1.0))
    assert full.peak_pages(16) == full_plan(TINY.scale_lengths(), TINY.depth).peak_pages(16)


def test_budget_settings_and_unknown_policy_errors():
    with pytest.raises(ValueError, match="kv_budget"):
        BudgetSettings(kv_budget=0)
    with pytest.raises(ValueError, match="delta"):
        BudgetSettings(delta=-1)
    with pytest.raises(ValueError, match="unknown policy"):
        budget_plan("nope", TINY.patch_nums, TINY.depth, BudgetSettings())
    with pytest.raises(ValueError, match="profile"):
        budget_plan("scalekv", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=0.1))
