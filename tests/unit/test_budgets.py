"""Budgets: exact totals at every compressed scale, whole leading scales, feasible quotas."""

from __future__ import annotations

import random

import pytest

from engine.models.registry import get_spec, shipped_profile_path
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
from memory.policies import POLICIES, POLICY_DEFAULTS, needs_profile
from memory.profile import ScaleProfile, normalize_drafters

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


# ------------------------------------------------------------------ refiner floor, drafters
SHIPPED_TINY = ScaleProfile.load(shipped_profile_path("var-tiny"), "var-tiny", tuple(TINY.patch_nums), TINY.depth)


def _refiners(plan, si):
    return [la for la in range(plan.num_layers) if la not in plan.drafters[si]]


def test_water_fill_floors_survive_alignment():
    assert water_fill(28, [424] * 7, align=16) == [28, 0, 0, 0, 0, 0, 0]  # the bug: floors lost
    assert water_fill(28, [424] * 7, align=16, floors=[4] * 7) == [4] * 7
    got = water_fill(60, [100] * 7, align=16, floors=[4] * 7)
    assert sum(got) == 60 and min(got) >= 4 and sum(-(-a // 16) for a in got) == 7  # still page-thrifty
    assert water_fill(13, [2, 50, 50], align=4, floors=[5, 5, 5]) == [2, 6, 5]  # floors clip to the cap
    with pytest.raises(ValueError, match="floors"):
        water_fill(10, [20, 20, 20], floors=[4, 4, 4])


@pytest.mark.parametrize("cfg", [TINY, MICRO, D16], ids=["tiny", "micro", "d16"])
@pytest.mark.parametrize("window", [1, 4, 9, 16, 25])
@pytest.mark.parametrize("align", [1, 4, 12, 16, 32])
def test_every_refiner_keeps_its_minimum_whatever_the_page_size(cfg, window, align):
    profiles = [PROFILES[k](cfg) for k in sorted(PROFILES)]
    if cfg is TINY:
        profiles.append(SHIPPED_TINY)
    for prof in profiles:
        for budget in (0.05, 0.1, 0.2):
            for delta in (None, 5.0):
                settings = BudgetSettings(kv_budget=budget, window_size=window, align=align, delta=delta)
                plan = budget_plan("scalekv", cfg.patch_nums, cfg.depth, settings, prof)
                check_plan(plan, cfg.patch_nums)
                u = uniform_tokens(cfg.patch_nums, budget)
                lengths = cfg.scale_lengths()
                for si in compressed_scales(cfg.patch_nums, budget):
                    assert sum(plan.kept[si]) == cfg.depth * u
                    for la in _refiners(plan, si):
                        held = plan.history(si, la) + lengths[si]
                        assert plan.kept[si][la] >= min(window, u, held), (prof.drafters, budget, si, la)


def _random_profile(cfg, rng) -> ScaleProfile:
    rows = [()]
    for _ in range(1, cfg.num_scales):
        n = min(cfg.depth, rng.choice([0, 1, 1, 2, 3, cfg.depth // 2]))
        rows.append(tuple(sorted(rng.sample(range(cfg.depth), n))))
    z = tuple(tuple(rng.gauss(0, 1) for _ in range(cfg.depth)) for _ in range(cfg.num_scales))
    return ScaleProfile(model="x", patch_nums=tuple(cfg.patch_nums), depth=cfg.depth, drafters=tuple(rows), zscore=z)


@pytest.mark.parametrize("cfg", [TINY, MICRO, D16], ids=["tiny", "micro", "d16"])
def test_random_profiles_never_ask_for_history_a_layer_no_longer_holds(cfg):
    """Property: kept <= previous kept + the scale's tokens, exact totals, refiner minimums,
    and a drafter keeps all it holds whenever the total allows (else refiners sit at their
    minimum and drafters share the rest)."""
    rng = random.Random(1234)
    lengths = cfg.scale_lengths()
    for _ in range(60):
        prof = _random_profile(cfg, rng)
        budget = rng.choice([0.03, 0.1, 0.2, 0.4])
        window, align = rng.choice([1, 4, 9, 16]), rng.choice([1, 4, 12, 16])
        mode = rng.choice(["calibrated", "sticky", "fixed"])
        settings = BudgetSettings(kv_budget=budget, window_size=window, align=align, drafter_mode=mode)
        plan = budget_plan("scalekv", cfg.patch_nums, cfg.depth, settings, prof)
        check_plan(plan, cfg.patch_nums)
        u = uniform_tokens(cfg.patch_nums, budget)
        floor = min(window, u)
        for si in compressed_scales(cfg.patch_nums, budget):
            held = [plan.history(si, la) + lengths[si] for la in range(cfg.depth)]
            row = plan.kept[si]
            assert all(0 <= k <= h for k, h in zip(row, held))
            assert sum(row) == cfg.depth * u
            drafters, refiners = plan.drafters[si], _refiners(plan, si)
            need = sum(held[la] for la in drafters) + sum(min(floor, held[la]) for la in refiners)
            if need <= cfg.depth * u:
                assert all(row[la] == held[la] for la in drafters), (prof.drafters, si)
            else:
                assert all(row[la] == min(floor, held[la]) for la in refiners), (prof.drafters, si)
            assert all(row[la] >= min(floor, held[la]) for la in refiners)


def test_sticky_and_fixed_drafters_do_not_move():
    readers = [si + 1 for si in compressed_scales(TINY.patch_nums, 0.1)]
    assert SHIPPED_TINY.drafters[readers[0]:] == ((0,), (6,), (0,), (0,), (1, 4))  # calibrated: moving
    fixed = normalize_drafters(SHIPPED_TINY, "fixed", readers)
    assert all(fixed.drafters[k] == (0,) for k in readers)  # the most frequent drafter
    assert fixed.drafters[:readers[0]] == SHIPPED_TINY.drafters[:readers[0]]
    assert normalize_drafters(SHIPPED_TINY, "fixed", readers, num_fixed=2).drafters[readers[0]] in ((0, 1), (0, 4),
                                                                                                      (0, 6))
    sticky = normalize_drafters(SHIPPED_TINY, "sticky", readers)
    assert all(sticky.drafters[k] == (0, 1, 4, 6) for k in readers)
    assert normalize_drafters(SHIPPED_TINY, "calibrated", readers) is SHIPPED_TINY
    with pytest.raises(ValueError, match="drafter_mode"):
        normalize_drafters(SHIPPED_TINY, "moving", readers)
    with pytest.raises(ValueError, match="drafter_mode"):
        BudgetSettings(drafter_mode="moving")
    # in the plan: a fixed drafter keeps its history from the first compressed scale on
    plan = budget_plan("scalekv", TINY.patch_nums, TINY.depth,
                       BudgetSettings(kv_budget=0.1, align=16, drafter_mode="fixed"), SHIPPED_TINY)
    comp = compressed_scales(TINY.patch_nums, 0.1)
    assert all(plan.drafters[si] == (0,) for si in comp)
    assert [plan.kept[si][0] for si in comp] == sorted(plan.kept[si][0] for si in comp)  # never shrinks
    shipped = budget_plan("scalekv", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=0.1, align=16),
                          SHIPPED_TINY)
    assert plan.kept[comp[-1]][0] > max(shipped.kept[comp[-1]])  # more history than any moving drafter


def test_named_policy_defaults_and_overrides_of_the_drafter_mode():
    comp = compressed_scales(TINY.patch_nums, 0.1)
    shipped = budget_plan("scalekv", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=0.1), SHIPPED_TINY)
    allq = budget_plan("scalekv-allq", TINY.patch_nums, TINY.depth, BudgetSettings(kv_budget=0.1), SHIPPED_TINY)
    assert POLICY_DEFAULTS["scalekv-allq"]["drafter_mode"] == "calibrated"
    assert allq.kept == shipped.kept and allq.name == "scalekv-allq"
    fixed = budget_plan("scalekv-allq", TINY.patch_nums, TINY.depth,
                        BudgetSettings(kv_budget=0.1, drafter_mode="fixed"), SHIPPED_TINY)
    assert all(fixed.drafters[si] == (0,) for si in comp)
    assert needs_profile("scalekv-allq") and needs_profile("scalekv") and not needs_profile("snapkv")


def _step_peaks(plan, cfg, block_size: int) -> list[int]:
    """Per step: most tokens of KV one sequence holds at once (pages held + one layer's scratch)."""
    from memory.budgets import step_peak

    lengths = cfg.scale_lengths()
    return [step_peak([plan.history(si, la) for la in range(cfg.depth)], plan.kept[si], block_size)[0] * block_size
            + lengths[si] for si in range(cfg.num_scales)]


DEEP = get_spec("var-deep").var


@pytest.mark.parametrize("cfg", [TINY, DEEP], ids=["tiny", "deep"])
def test_peak_limit_bounds_every_step_or_says_it_cannot(cfg):
    """Property over random profiles: with ``peak_limit`` every step's peak (pages + scratch)
    stays within the limit, or the plan is refused naming peak_limit; quotas stay feasible,
    compressed scales keep at most layers x U, and a plan that already fits is unchanged."""
    from memory.budgets import full_step_peak_tokens

    rng = random.Random(99)
    refused = fitted = 0
    for _ in range(40):
        prof = _random_profile(cfg, rng)
        budget, align = rng.choice([0.04, 0.1, 0.2]), rng.choice([1, 8, 16])
        base = BudgetSettings(kv_budget=budget, align=align, drafter_mode=rng.choice(["calibrated", "fixed"]))
        free = budget_plan("scalekv", cfg.patch_nums, cfg.depth, base, prof)
        full = full_step_peak_tokens(cfg.patch_nums, cfg.depth, align)
        limit = max(_step_peaks(free, cfg, align)) / full * rng.uniform(0.85, 1.05)  # around the plan's own peak
        cap = int(limit * full)
        try:
            plan = budget_plan("scalekv", cfg.patch_nums, cfg.depth,
                               BudgetSettings(**{**base.__dict__, "peak_limit": limit}), prof)
        except ValueError as e:
            assert "peak_limit" in str(e)
            assert max(_step_peaks(free, cfg, align)) > cap
            refused += 1
            continue
        check_plan(plan, cfg.patch_nums)
        assert max(_step_peaks(plan, cfg, align)) <= cap
        u = uniform_tokens(cfg.patch_nums, budget)
        assert all(sum(plan.kept[si]) <= cfg.depth * u for si in compressed_scales(cfg.patch_nums, budget))
        if max(_step_peaks(free, cfg, align)) <= cap:
            assert plan.kept == free.kept
        else:
            fitted += 1
    assert refused and fitted  # both branches exercised


def test_peak_limit_trims_refiners_before_an_early_drafter_grows():
    """var-deep at 10% with drafters at layers 1 and 6 (a calibrated profile's shape): the
    drafters' growth at scale 8 lifts the step above 0.12 of full; the limit brings it under by
    trimming only refiners at scale 7, and the drafters keep their whole history."""
    from memory.budgets import full_step_peak_tokens

    prof = _profile(DEEP, lambda si: [1, 6])
    free = budget_plan("scalekv", DEEP.patch_nums, DEEP.depth, BudgetSettings(kv_budget=0.1, align=16), prof)
    plan = budget_plan("scalekv", DEEP.patch_nums, DEEP.depth,
                       BudgetSettings(kv_budget=0.1, align=16, peak_limit=0.12), prof)
    full = full_step_peak_tokens(DEEP.patch_nums, DEEP.depth, 16)
    assert max(_step_peaks(free, DEEP, 16)) > 0.12 * full >= max(_step_peaks(plan, DEEP, 16))
    changed = [si for si in range(DEEP.num_scales) if plan.kept[si] != free.kept[si]]
    assert changed
    cum = cumulative_lengths(DEEP.patch_nums)
    for si in changed:
        trimmed = [la for la in range(DEEP.depth) if plan.kept[si][la] < free.kept[si][la]]
        assert trimmed and not set(trimmed) & {1, 6}
        assert all(plan.kept[si][la] >= 16 for la in trimmed)
    assert all(plan.kept[si][la] == cum[si] for si in range(DEEP.num_scales - 1) for la in (1, 6))
