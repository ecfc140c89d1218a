"""Selection policies: valid indices (unique, sorted, in range, window included), per-head choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memory.policies import (
    POLICIES,
    POLICY_DEFAULTS,
    H2OPolicy,
    SelectionContext,
    all_query_scores,
    grid_window,
    last_window,
    make_policy,
    pool_scores,
    topk_keep,
    window_scores,
)


def _inputs(s=3, h=4, side=8, hist=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(s, h, side * side, d, generator=g), dim=-1) * 4
    keys = F.normalize(torch.randn(s, h, hist + side * side, d, generator=g), dim=-1)
    return q, keys


def _ctx(side=8, hist=40, capacity=30, seqs=(0, 1, 2), layer=0):
    return SelectionContext(layer=layer, scale=3, side=side, hist_len=hist, capacity=capacity, softmax_scale=1.0,
                            seqs=tuple(seqs))


def test_grid_window_takes_cell_centres_and_falls_back_to_all_tokens():
    w = grid_window(16, 16)
    rows = sorted({int(i) // 16 for i in w})
    assert rows == [1, 5, 9, 13] and sorted({int(i) % 16 for i in w}) == [1, 5, 9, 13]
    assert grid_window(4, 16).tolist() == list(range(16))  # every token is its own cell
    assert grid_window(3, 16).tolist() == list(range(9))  # map smaller than the grid: all of it
    assert len(set(grid_window(13, 16).tolist())) == 16
    assert grid_window(5, 4).tolist() == [0, 3, 15, 18]  # cells [0, 2) and [2, 5)
    with pytest.raises(ValueError, match="perfect square"):
        grid_window(8, 10)
    assert last_window(4, 5).tolist() == [11, 12, 13, 14, 15]


@pytest.mark.parametrize("name", [p for p in POLICIES if p != "full"])
@pytest.mark.parametrize("capacity", [16, 17, 50, 104])
def test_selected_indices_are_unique_sorted_in_range_and_keep_the_window(name, capacity):
    q, keys = _inputs()
    ctx = _ctx(capacity=capacity)
    policy = make_policy(name, window_size=16)
    if isinstance(policy, H2OPolicy):  # as if it had observed the 40 history tokens
        policy._acc.update({(seq, 0): torch.rand(4, 40) for seq in ctx.seqs})
    idx = policy.select(ctx, q, keys)
    n = keys.shape[2]
    if idx is None:  # h2o keeps everything when nothing must go
        assert capacity == n
        return
    assert idx.shape == (3, 4, capacity) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert bool((idx[..., 1:] > idx[..., :-1]).all())  # sorted and unique
    if name in ("snapkv", "pyramidkv", "scalekv"):
        win = policy.window_positions(8) + ctx.hist_len
        for s in range(3):
            for h in range(4):
                assert set(win.tolist()) <= set(idx[s, h].tolist())


def test_scalekv_chooses_per_sequence_and_per_head():
    q, keys = _inputs()
    idx = make_policy("scalekv").select(_ctx(capacity=30), q, keys)
    assert not torch.equal(idx[0, 0], idx[0, 1]) and not torch.equal(idx[0, 0], idx[1, 0])


def test_window_scoring_prefers_the_attended_tokens():
    q, keys = _inputs(s=1, h=1)
    policy = make_policy("scalekv", pool_kernel=1)
    target = 7  # a history token every window query looks at
    keys[0, 0, target] = F.normalize(torch.ones(16), dim=0)
    q[0, 0, policy.window_positions(8)] = 4 * keys[0, 0, target]
    idx = policy.select(_ctx(capacity=17, seqs=(0,)), q, keys)
    assert target in idx[0, 0].tolist()


def test_sliding_and_streaming_keep_recent_and_sinks():
    q, keys = _inputs()
    n = keys.shape[2]
    sl = make_policy("sliding").select(_ctx(capacity=10), q, keys)
    assert sl[0, 0].tolist() == list(range(n - 10, n))
    st = make_policy("streaming").select(_ctx(capacity=10), q, keys)
    assert st[2, 3].tolist() == [0, 1, 2, 3] + list(range(n - 6, n))


def test_h2o_accumulates_across_scales_and_releases_state():
    pol = H2OPolicy()
    q, keys = _inputs(s=2, hist=0, side=4)
    assert pol.select(_ctx(side=4, hist=0, capacity=16, seqs=(5, 6)), q, keys) is None  # observe only
    assert pol.num_tracked == 2
    q2, keys2 = _inputs(s=2, hist=16, side=8, seed=1)
    idx = pol.select(_ctx(side=8, hist=16, capacity=20, seqs=(5, 6)), q2, keys2)
    assert idx.shape == (2, 4, 20)
    assert pol._acc[(5, 0)].shape == (4, 20)
    with pytest.raises(RuntimeError, match="history has"):  # state out of step with the cache
        pol.select(_ctx(side=8, hist=16, capacity=20, seqs=(5, 6)), q2, keys2)
    pol.release(5)
    pol.release(6)
    assert pol.num_tracked == 0


def test_topk_keep_and_pooling_edge_cases():
    scores = torch.arange(10.0).view(1, 1, 10)
    assert topk_keep(scores, torch.tensor([0, 1]), 4)[0, 0].tolist() == [0, 1, 8, 9]
    assert topk_keep(scores, torch.tensor([5, 2, 7]), 2)[0, 0].tolist() == [2, 5]  # more forced than room
    with pytest.raises(ValueError, match="capacity"):
        topk_keep(scores, torch.tensor([]), 11)
    for kind in ("max", "avg"):
        assert pool_scores(scores, 5, kind).shape == scores.shape
    assert pool_scores(scores, 5, "max")[0, 0, 0] == 2.0
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(scores, 5, "median")


def test_make_policy_validates_knobs():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError, match="perfect square"):
        make_policy("scalekv", window_size=10)
    with pytest.raises(ValueError, match="pool_kernel"):
        make_policy("snapkv", pool_kernel=4)
    assert make_policy("full").select(_ctx(capacity=104), *_inputs()) is None


def test_all_query_scores_are_blockwise_exact():
    q, keys = _inputs(side=8, hist=40)
    whole = all_query_scores(q, keys, 1.0, block=10_000)
    assert torch.allclose(all_query_scores(q, keys, 1.0, block=7), whole, atol=1e-5)
    assert torch.allclose(whole, window_scores(q, keys, 1.0), atol=1e-5)
    assert torch.allclose(whole.sum(-1), torch.full((3, 4), 64.0), atol=1e-3)  # softmax rows sum to 1
    logits = all_query_scores(q, keys, 0.5, score="logits", block=5)
    assert torch.allclose(logits, (q @ keys.transpose(-1, -2)).sum(2) * 0.5, atol=1e-4)


@pytest.mark.parametrize("name", ["scalekv", "scalekv-allq", "snapkv"])
def test_all_query_scoring_keeps_the_top_tokens_by_every_query(name):
    q, keys = _inputs()
    policy = make_policy(name, score_queries="all", pool_kernel=1)
    ctx = _ctx(capacity=20)
    idx = policy.select(ctx, q, keys)
    want = all_query_scores(q, keys, 1.0).topk(20, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx, want)  # no forced window: purely the top 20 by all-query attention
    # a history token that only non-window queries look at survives all-query scoring only
    q1, k1 = _inputs(s=1, h=1)
    target, win = 3, make_policy("scalekv").window_positions(8)
    others = torch.tensor([i for i in range(64) if i not in set(win.tolist())])
    k1[0, 0, target] = F.normalize(torch.ones(16), dim=0)
    q1[0, 0, others] = 8 * k1[0, 0, target]
    ctx1 = _ctx(capacity=17, seqs=(0,))
    assert target in make_policy("scalekv", score_queries="all").select(ctx1, q1, k1)[0, 0].tolist()
    assert target not in make_policy("scalekv", pool_kernel=1).select(ctx1, q1, k1)[0, 0].tolist()


def test_policy_knob_defaults_and_validation():
    allq, paper = make_policy("scalekv-allq"), make_policy("scalekv")
    assert (allq.score_queries, allq.score, allq.window, allq.pool_kernel) == ("all", "softmax", "grid", 1)
    assert (paper.score_queries, paper.score, paper.pool_kernel) == ("window", "softmax", 5)
    assert make_policy("scalekv-allq", pool_kernel=5).pool_kernel == 5
    assert make_policy("scalekv-allq", score_queries="window").score_queries == "window"
    assert make_policy("scalekv", score="logits").describe()["score"] == "logits"
    assert POLICY_DEFAULTS["scalekv"]["drafter_mode"] == "calibrated"
    with pytest.raises(ValueError, match="score_queries"):
        make_policy("scalekv", score_queries="some")
    with pytest.raises(ValueError, match="score"):
        make_policy("snapkv", score="entropy")
