"""Importing released ScaleKV budget files: mapping, start rule, checks, replay, the engine."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from memory.budgets import BudgetSettings, budget_plan, capacity_plan, check_plan, scalekv_plan
from memory.profile import ScaleProfile
from memory.profile_import import import_released_budgets, load_released_budgets

INF_1M = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]


def _entry(depth: int, drafters: tuple[int, ...], cap_max: int, cap_min: int, limit: int | None = None) -> dict:
    e = {f"Block {b}": 1 if b in drafters else 0 for b in range(depth)}
    e.update({"High": len(drafters), "Max": cap_max, "Min": cap_min})
    if limit is not None:
        e["Limit"] = limit
    return e


# Infinity-2B's released 10% file, in its format (32 blocks; drafters {0, 23}, then {0}).
RELEASED_2B_10 = json.loads(json.dumps({
    "Scale 9": _entry(32, (0, 23), 920, 632, 921),
    "Scale 10": _entry(32, (0, 23), 1490, 594, 1496),
    "Scale 11": _entry(32, (0, 23), 2510, 526, 2514),
    "Scale 12": _entry(32, (0, 23), 4100, 420, 4110),
    "Scale 13": _entry(32, (0,), 6385, 465, 6404),
}))


def _import(data=None, **kw):
    return import_released_budgets(RELEASED_2B_10 if data is None else data, "infinity-2b", INF_1M, 32, **kw)


def test_mapping_start_rule_and_inferred_capacity():
    prof, rep = _import()
    assert rep.json_scales == [9, 10, 11, 12, 13] and rep.reader_scales == [8, 9, 10, 11, 12]
    assert rep.base_capacity == 650 and rep.budget == 0.1 and rep.first_compressed_scale == 7
    assert rep.limit_mismatches == [] and rep.warnings == []
    assert set(rep.totals.values()) == {32 * 650}
    # "Scale s" is the cache kept after scale index s - 2, read by scale s - 1
    assert prof.drafters[8] == (0, 23) and prof.drafters[12] == (0,) and not any(prof.drafters[:8])
    assert prof.capacities[8][0] == 920 and prof.capacities[8][1] == 632 and prof.capacities[12][23] == 465
    assert not any(prof.capacities[:8])


def test_replay_keeps_the_released_budgets():
    prof, _ = _import()
    plan = capacity_plan(prof)
    check_plan(plan, INF_1M)
    assert plan.kept[6] == (521,) * 32  # 16x16 and before: whole (<= max_capacity)
    assert plan.kept[7][0] == plan.kept[7][23] == 920 and plan.kept[7][5] == 632  # after the 20x20 map
    assert plan.kept[10][23] == 4100 and plan.kept[11][23] == 465 and plan.kept[11][0] == 6385
    assert plan.kept[12] == (0,) * 32 and plan.drafters[11] == (0,)
    # the engine's dispatch replays it at the file's budget, and splits at any other
    settings = BudgetSettings(kv_budget=0.1, window_size=16, align=16)
    assert budget_plan("scalekv", INF_1M, 32, settings, prof).kept == plan.kept
    assert budget_plan("scalekv", INF_1M, 32, BudgetSettings(kv_budget=650 / 6425), prof).kept == plan.kept
    other = budget_plan("scalekv", INF_1M, 32, BudgetSettings(kv_budget=0.2, align=16), prof)
    assert other.kept == scalekv_plan(prof, BudgetSettings(kv_budget=0.2, align=16)).kept != plan.kept


def test_round_trip_and_old_profiles_unchanged(tmp_path):
    prof, _ = _import(source="2b_10.json")
    path = tmp_path / "p.json"
    prof.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["base_capacity"] == 650 and sorted(data["capacities"], key=int)[0] == "8"
    back = ScaleProfile.load(path, "infinity-2b", tuple(INF_1M), 32)
    assert back == prof
    shipped = Path(__file__).resolve().parents[2] / "engine/models/weights/var-tiny/scale_profile.json"
    old = ScaleProfile.load(shipped, "var-tiny")
    assert not old.capacities and old.base_capacity is None
    old.save(tmp_path / "old.json")
    assert (tmp_path / "old.json").read_text() == shipped.read_text()  # written exactly as before


def test_other_budget_files_start_elsewhere():
    """A 4%-style file: max_capacity 265 compresses from scale index 6 on, so it starts at
    "Scale 8"; depth 4 with made-up budgets (total 4 x 265 at every scale)."""
    data = {"Scale 8": _entry(4, (0,), 520, 180, 521), "Scale 9": _entry(4, (0,), 700, 120, 920)}
    data.update({f"Scale {s}": _entry(4, (0, 1), 450, 80) for s in range(10, 14)})
    prof, rep = import_released_budgets(data, "m", INF_1M, 4)
    assert rep.base_capacity == 265 and rep.first_compressed_scale == 6 and rep.budget == 0.04
    assert rep.limit_mismatches == []
    plan = capacity_plan(prof)
    check_plan(plan, INF_1M)
    assert plan.kept[5] == (265,) * 4 and plan.kept[6] == (520, 180, 180, 180)
    assert plan.kept[8] == (450, 450, 80, 80)  # layer 1 turns drafter holding 120 + 576: keeps 450
    # given explicitly, a capacity under which the file starts too late is refused
    with pytest.raises(ValueError, match="needs \"Scale 7\""):
        import_released_budgets(data, "m", INF_1M, 4, base_capacity=200)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["Scale 10"].update(High=3), "High is 3"),
    (lambda d: d["Scale 11"].pop("Block 7"), "missing \\[7\\]"),
    (lambda d: d["Scale 11"].update({"Block 40": 0}), "unknown \\[40\\]"),
    (lambda d: d.pop("Scale 11"), "without gaps"),
    (lambda d: d.pop("Scale 13"), "without gaps"),
    (lambda d: d.update({"scale_9": {}}), "unknown key"),
    (lambda d: d["Scale 9"].update(Max="lots"), "expected an integer"),
    (lambda d: d["Scale 9"].update({"Block 3": 2}), "0 or 1"),
    (lambda d: d["Scale 12"].update(Min=400), "cannot infer max_capacity"),
    (lambda d: d.update({"Scale 14": d["Scale 13"]}), "outside"),
    (lambda d: d.pop("Scale 9"), "needs \"Scale 9\""),
])
def test_bad_files_are_refused_naming_the_key(mutate, match):
    data = copy.deepcopy(RELEASED_2B_10)
    mutate(data)
    with pytest.raises(ValueError, match=match):
        _import(data, base_capacity=650) if "infer" not in match and "without" not in match else _import(data)


def test_limit_mismatch_is_reported_not_fatal():
    data = copy.deepcopy(RELEASED_2B_10)
    data["Scale 11"]["Limit"] = 2500
    _, rep = _import(data)
    assert len(rep.limit_mismatches) == 1 and "Scale 11" in rep.limit_mismatches[0]


def test_cli_import(tmp_path, capsys):
    from scalekv.cli import main

    src = tmp_path / "2b_10%_budget.json"
    src.write_text(json.dumps(RELEASED_2B_10))
    out = tmp_path / "prof.json"
    assert main(["profile", "import", str(src), "--model", "infinity-2b", "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["base_capacity"] == 650 and rep["reader_scales"] == [8, 9, 10, 11, 12]
    prof, _ = load_released_budgets(src, "infinity-2b", INF_1M, 32)
    assert ScaleProfile.load(out) == prof and prof.budget_source == src.name
    assert main(["profile", "import", str(tmp_path / "missing.json"), "--model", "infinity-2b", "--out", str(out)]) == 2


def test_engine_runs_an_imported_file(micro_model, tmp_path):
    """var-micro (scales 1, 2, 4, 8; 2 layers) with a released-format file: max_capacity 8
    compresses after scale index 2 only ("Scale 4"); the paged engine keeps exactly those
    budgets and equals the dense reference compressed the same way."""
    from engine.api import EngineConfig, ImageEngine
    from memory.policies import make_policy
    from tests.unit.test_compression_engine import _dense_generate, _reqs, _tokens

    data = {"Scale 4": _entry(2, (0,), 12, 4, 21)}
    src = tmp_path / "micro.json"
    src.write_text(json.dumps(data))
    prof, rep = load_released_budgets(src, "var-micro", (1, 2, 4, 8), 2)
    assert rep.base_capacity == 8 and rep.first_compressed_scale == 2 and rep.budget == 0.38
    path = tmp_path / "prof.json"
    prof.save(path)
    eng = ImageEngine(micro_model, EngineConfig(dtype="float32", block_size=4, window_size=4, kv_pool_bytes=4 << 20,
                                                profile_path=str(path), policy="scalekv", kv_budget=0.38))
    plan = eng.plan_for("scalekv", 0.38)
    assert plan.kept == ((1, 1), (5, 5), (12, 4), (0, 0))
    reqs = _reqs(2)
    got = _tokens(eng.generate(reqs))
    want = _dense_generate(micro_model, [r.resolved(1.5, 10, 0.9) for r in reqs], plan, make_policy("scalekv", 4))
    assert got == want
    assert eng.pool.num_free == eng.pool.num_pages
