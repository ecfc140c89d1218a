"""Capacity planner: the paper's analytic KV table exactly, the memory manager's page math,
concurrency that admission really reaches, roofline sanity, schedules, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.shapes import INFINITY_SHAPES, default_profile, get_shape, released_profile, shipped_profile_file
from memory.budgets import BudgetSettings, budget_plan, check_plan, reference_length
from memory.planner import (
    DEVICES,
    analytic_kv_bytes,
    mib,
    page_bytes,
    paper_memory_table,
    plan_capacity,
    request_plan,
    workload,
)

INF2B, INF8B = INFINITY_SHAPES["infinity-2b"], INFINITY_SHAPES["infinity-8b"]


def test_paper_memory_table_exactly():
    """ScaleKV's table (batch 8 = 16 rows with CFG): 6425 vs 650 tokens per layer, K fp32 +
    V bf16, MiB truncated."""
    t2, t8 = paper_memory_table(INF2B, batch=8), paper_memory_table(INF8B, batch=8)
    assert (t2["full"], t2["10%"]) == (38_550, 3_900)
    assert (t8["full"], t8["10%"]) == (84_328, 8_531)
    assert (t2["20%"], t2["4%"], t8["20%"], t8["4%"]) == (7_800, 1_590, 17_062, 3_478)
    assert reference_length([h for h, _ in INF2B.default_schedule()]) == 6425


def test_the_convention_is_the_only_one_that_fits():
    full = 6425
    assert analytic_kv_bytes(INF2B, full, 8) == 38_550 * 2**20  # exact MiB
    assert analytic_kv_bytes(INF8B, full, 8) / 2**20 == 84_328.125  # truncated, not rounded up
    assert analytic_kv_bytes(INF2B, full, 8) // 10**6 != 38_550  # not MB = 10**6
    assert mib(analytic_kv_bytes(INF2B, full, 8, "bfloat16", "bfloat16")) != 38_550  # not all bf16
    assert mib(analytic_kv_bytes(INF2B, 10_521, 8)) != 38_550  # not every token of the last scale


def test_shapes():
    assert (INF2B.depth, INF2B.width, INF2B.num_heads, INF2B.head_dim) == (32, 2048, 16, 128)
    assert (INF8B.depth, INF8B.width, INF8B.num_heads, INF8B.head_dim) == (40, 3584, 28, 128)
    sq = INF2B.schedule(1024, "1:1")
    assert sum(h * w for h, w in sq) == 10_521 and len(sq) == 13
    assert len(INF2B.schedule(512)) == 10 and len(INF2B.schedule(256)) == 7 and len(INF2B.schedule(768)) == 12
    assert INF2B.schedule(1024, "1:2") == tuple((w, h) for h, w in INF2B.schedule(1024, "2:1"))
    assert INF2B.schedule(1024, "2:1")[-1] == (90, 45)
    assert len(INF2B.aspects) == 15
    d16 = get_shape("var-d16")
    assert (d16.depth, d16.num_heads, d16.head_dim, d16.mlp_hidden) == (16, 16, 64, 4096)
    assert abs(d16.num_params - 310.3e6) < 0.5e6 and abs(get_shape("var-d30").num_params - 2010.0e6) < 1e6
    assert get_shape("var-tiny").schedule() == tuple((p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    with pytest.raises(ValueError, match="aspect"):
        INF2B.schedule(1024, "9:7")
    with pytest.raises(ValueError, match="unknown model"):
        get_shape("nope")


def test_shipped_profile_file_is_the_registrys():
    from engine.models.registry import shipped_profile_path

    assert shipped_profile_file("var-tiny") == shipped_profile_path("var-tiny").resolve()
    assert default_profile("var-tiny").model == "var-tiny"
    assert default_profile("infinity-8b").capacities


@pytest.mark.parametrize("policy,budget", [("full", 1.0), ("snapkv", 0.1), ("pyramidkv", 0.2), ("scalekv", 0.1),
                                           ("scalekv", 0.3)])
def test_concurrency_is_what_admission_reaches(policy, budget):
    """The planner's limit equals the number of requests MemoryManager.try_reserve admits."""
    import torch

    from memory.manager import MemoryManager
    from memory.pool import KVPool

    shape = get_shape("var-tiny")
    prof = default_profile("var-tiny")
    nbytes = 64 << 20
    rep = plan_capacity(shape, DEVICES["h100-80gb"], policy, budget, profile=prof, kv_pool_bytes=nbytes,
                        k_dtype="float32", v_dtype="float32", block_size=16)
    assert rep.page_bytes == KVPool.bytes_per_page(16, shape.num_heads, shape.head_dim, torch.float32)
    pool = KVPool.from_bytes(nbytes, 16, shape.num_heads, shape.head_dim, torch.float32)
    assert pool.num_pages == rep.pool_pages
    # the engine's plan: ImageEngine.budget_settings (align = block size) through budget_plan
    plan = budget_plan(policy, [p for p, _ in shape.schedule()], shape.depth,
                       BudgetSettings(kv_budget=budget, window_size=16, align=16), prof)
    assert request_plan(shape, shape.schedule(), policy, budget, 16, 16, None, prof).kept == plan.kept
    mm = MemoryManager(pool)
    assert mm.request_pages(plan) == rep.request_pages
    admitted = 0
    while mm.try_reserve(f"r{admitted}", (2 * admitted, 2 * admitted + 1), plan):
        admitted += 1
    assert admitted == rep.max_concurrent_requests > 0


def test_released_budgets_plan_and_its_pool_cost():
    prof = released_profile("infinity-2b")
    sched = INF2B.schedule()
    plan = request_plan(INF2B, sched, "scalekv", 0.1, profile=prof)
    grid = [h for h, _ in sched]
    check_plan(plan, grid)
    assert plan.kept[6] == (521,) * 32 and plan.kept[7][0] == 920 and plan.kept[7][1] == 632
    assert all(sum(plan.kept[si]) == 32 * 650 for si in range(7, 12))
    rep = plan_capacity(INF2B, DEVICES["h200"], "scalekv", 0.1, profile=prof)
    assert rep.plan_source == "capacities" and rep.budget_tokens == 650
    assert rep.analytic_bytes_per_request * 8 == 3_900 * 2**20
    # the pool pays whole pages and the layer-by-layer transient: more than the analytic figure
    assert rep.reserved_bytes_per_request > rep.analytic_bytes_per_request
    other = plan_capacity(INF2B, DEVICES["h200"], "scalekv", 0.2, profile=prof)
    assert other.plan_source == "budget split" and other.budget_tokens == 1300


def test_full_plan_costs_the_prefix_in_pages():
    rep = plan_capacity(INF2B, DEVICES["h100-80gb"], "full")
    assert rep.request_pages == 2 * 32 * -(-6425 // 16)
    assert rep.page_bytes == page_bytes(16, 16, 128, 4, 2)
    assert rep.max_concurrent_requests == rep.pool_pages // rep.request_pages
    free = DEVICES["h100-80gb"].memory_bytes - (INF2B.num_params + INF2B.aux_params) * 2
    assert rep.pool_bytes == int(free * 0.9)


def test_roofline():
    sched = INF2B.schedule()
    full = workload(INF2B, sched, request_plan(INF2B, sched, "full"), text_tokens=0)
    comp = workload(INF2B, sched, request_plan(INF2B, sched, "scalekv", 0.1, profile=released_profile("infinity-2b")),
                    text_tokens=0)
    tokens = 2 * 10_521
    # per image token and layer: QKV + proj + cross-attention Q + proj (6 C^2) + FFN (2 C F) MACs, plus the head;
    # the block's cross-attention K/V weights only see text, so this is ~85% of 2 x parameters x tokens
    c, f = INF2B.width, INF2B.mlp_hidden
    assert full.linear_flops == 2 * tokens * (32 * (6 * c * c + 2 * c * f) + c * INF2B.head_out)
    assert 0.8 < full.linear_flops / (2 * INF2B.num_params * tokens) < 0.9
    assert comp.linear_flops == full.linear_flops
    assert comp.attention_flops < full.attention_flops and comp.kv_read_bytes < full.kv_read_bytes
    # the last scale attends over its 6425-token prefix + itself in every layer with the full cache
    assert full.kv_read_bytes > 2 * 32 * (6425 + 4096) * 2048 * 6
    r = plan_capacity(INF2B, DEVICES["h100-80gb"], "full", batch=1).roofline
    assert r["batch"] == 1 and r["images_per_s"] > 0 and r["bound"] in ("compute", "memory")


def test_non_square_and_lower_resolutions_plan():
    prof = released_profile("infinity-8b")
    for res, aspect in ((1024, "2:1"), (1024, "3:4"), (512, "1:1")):
        sched = INF8B.schedule(res, aspect)
        plan = request_plan(INF8B, sched, "scalekv", 0.1, profile=prof)
        check_plan(plan, [tuple(hw) for hw in sched])
        u = INF8B.budget_tokens(0.1, sched)
        assert u == round(0.1 * reference_length([tuple(hw) for hw in sched]))
        rep = plan_capacity(INF8B, DEVICES["h200"], "scalekv", 0.1, resolution=res, aspect=aspect, profile=prof)
        assert rep.plan_source == "budget split" and rep.max_concurrent_requests > 0


def test_no_torch_and_cli(tmp_path):
    code = ("import sys, json; from scalekv.cli import main; "
            "main(['plan', '--paper-table', '--json', '--models', 'infinity-2b', 'infinity-8b']); "
            "main(['plan', '--json', '--models', 'infinity-8b', '--devices', 'h200', '--policies', 'full,scalekv']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["mib"]["infinity-8b"]["10%"] == 8_531
    assert [r["policy"] for r in lines[1:]] == ["full", "scalekv"]
    assert lines[2]["max_concurrent_requests"] > 8 * lines[1]["max_concurrent_requests"]


def test_uniform_budget_that_fills_its_pages():
    """17 tokens a layer occupy 2 pages of 16 in every layer; the suggested budget keeps 32 in the
    same pages (same request_pages), and policies that share pages get no suggestion."""
    deep = get_shape("var-deep")
    dev = DEVICES["h200"]
    rep = plan_capacity(deep, dev, "h2o", 0.04, k_dtype="float32", v_dtype="float32")
    assert (rep.budget_tokens, rep.page_fill_tokens) == (17, 32)
    filled = plan_capacity(deep, dev, "h2o", rep.page_fill_budget, k_dtype="float32", v_dtype="float32")
    assert filled.budget_tokens == 32 and filled.request_pages == rep.request_pages
    assert filled.page_fill_budget is None  # already whole pages
    tiny = plan_capacity(get_shape("var-tiny"), dev, "scalekv", 0.04, profile=default_profile("var-tiny"))
    assert tiny.page_fill_budget is None
    assert plan_capacity(deep, dev, "full").page_fill_budget is None
