"""Inverse-CDF token pick: right-sided search, so filtered (probability-0) tokens are never drawn."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import filter_logits, make_generator, pick_from_cdf, sample_from_logits


def _brute_force_pick(cdf: torch.Tensor, u: torch.Tensor) -> list[int]:
    """First token whose cdf exceeds u; if none (u == total), first whose cdf reaches u."""
    out = []
    for row, x in zip(cdf.tolist(), u.reshape(-1).tolist()):
        above = [i for i, c in enumerate(row) if c > x]
        out.append(above[0] if above else next(i for i, c in enumerate(row) if c >= x))
    return out


def _cdf(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).cumsum(-1)


def test_u_zero_never_picks_filtered_leading_tokens():
    inf = float("-inf")
    logits = torch.tensor([
        [inf, 1.0, 2.0, 0.5],  # token 0 filtered: cdf[0] == 0
        [inf, inf, inf, 3.0],  # only the last token survives
        [0.1, 1.0, inf, 2.0],  # nothing filtered at the front: token 0 is the pick
        [inf, inf, 0.0, inf],  # one survivor in the middle, filtered tokens after it too
    ])
    cdf = _cdf(logits)
    assert cdf[0, 0] == 0 and cdf[1, 2] == 0
    u = torch.zeros(4)
    assert pick_from_cdf(cdf, u).tolist() == [1, 3, 0, 2]
    assert torch.searchsorted(cdf, u[:, None]).squeeze(-1).tolist()[:2] == [0, 0]  # the old bug
    assert pick_from_cdf(cdf, u[:, None]).tolist() == [1, 3, 0, 2]  # [N, 1] works too


def test_exact_ties_and_the_total_skip_zero_probability_tokens():
    cdf = torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.25, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]])
    # tie at an interior cdf value: the next token of positive probability (3), never token 2
    assert pick_from_cdf(cdf[:1], torch.tensor([0.5])).tolist() == [3]
    # u == total (rand * total rounded up): the token where the cdf reaches the total, not 3
    assert pick_from_cdf(cdf[1:2], torch.tensor([1.0])).tolist() == [2]
    assert pick_from_cdf(cdf[2:], torch.tensor([1.0])).tolist() == [3]
    assert pick_from_cdf(cdf[2:], torch.tensor([0.0])).tolist() == [1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_u_matches_brute_force_and_the_left_search_off_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n, v = 64, 37
    logits = torch.randn(n, v, generator=gen) * 3
    logits[torch.rand(n, v, generator=gen) < 0.4] = float("-inf")  # scattered filtered tokens
    logits[:, 0] = torch.where(torch.arange(n) % 2 == 0, float("-inf"), logits[:, 0])
    logits[torch.arange(n), torch.randint(0, v, (n,), generator=gen)] = 1.0  # >= 1 survivor per row
    cdf = _cdf(logits)
    u = torch.rand(n, generator=gen) * cdf[:, -1]
    u[:8] = 0  # include the u == 0 edge
    u[8:12] = cdf[8:12, -1]  # and u == total
    u[12:16] = cdf[12:16, 5]  # and exact ties with an interior cdf value
    got = pick_from_cdf(cdf, u)
    assert got.tolist() == _brute_force_pick(cdf, u)
    assert torch.isfinite(logits.gather(1, got[:, None])).all()  # never a filtered token
    left = torch.searchsorted(cdf, u[:, None]).squeeze(-1)
    off_tie = ~(cdf == u[:, None]).any(-1) & (u > 0)
    assert off_tie.sum() > 40
    assert torch.equal(got[off_tie], left[off_tie])


def test_sampler_with_a_zero_uniform_draws_a_surviving_token(monkeypatch):
    """End to end through ``sample_from_logits``: force torch.rand to return exactly 0."""
    logits = filter_logits(torch.tensor([[0.0, 5.0, 4.0, -1.0, 4.5]] * 3), top_k=3, top_p=0.0)
    assert torch.isinf(logits[:, 0]).all()

    def zeros(*shape, **kw):
        kw.pop("generator", None)
        return torch.zeros(*shape, **kw)

    monkeypatch.setattr(torch, "rand", zeros)
    assert sample_from_logits(logits, make_generator(0)).tolist() == [1, 1, 1]


def test_sampler_is_seeded_and_respects_the_filter():
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(3))
    kept = filter_logits(logits, top_k=5, top_p=0.0)
    a = sample_from_logits(kept, make_generator(11))
    b = sample_from_logits(kept, make_generator(11))
    assert torch.equal(a, b)
    assert torch.isfinite(kept.gather(1, a[:, None])).all()


def _loop_sample_scale(lc, lu, requests, generators, si, num_scales):
    """The per-request loop ``sample_scale`` replaced: guide, filter and sample one request at a time."""
    from engine.sampling import guidance_weight, guide

    out = []
    for b, req in enumerate(requests):
        t = guidance_weight(float(req.cfg), si, num_scales)
        row = filter_logits(guide(lc[b], lu[b], t), int(req.top_k), float(req.top_p))
        out.append(sample_from_logits(row, generators[b]))
    return torch.stack(out)


@pytest.mark.parametrize("mixed", [False, True])
def test_batched_sample_scale_draws_the_per_request_loop_tokens(mixed):
    """Batched across requests, the tokens (and each generator's state after) are those of the
    per-request loop, also with requests of different cfg / top-k / top-p in one call, and with
    tied logits (quantised values) that exercise the sort and the filters."""
    from engine.request import ImageRequest
    from engine.sampling import sample_scale

    g = torch.Generator().manual_seed(5)
    b, n, v = 6, 37, 64
    lc = (torch.randn(b, n, v, generator=g) * 4).round() / 2
    lu = (torch.randn(b, n, v, generator=g) * 4).round() / 2
    reqs = [ImageRequest(class_label=0, seed=s, cfg=(1.5 + s if mixed else 4.0),
                         top_k=([0, 5, 20][s % 3] if mixed else 20), top_p=([0.0, 0.9, 0.5][s % 3] if mixed else 0.9),
                         request_id=str(s)) for s in range(b)]
    for si in (0, 3, 9):
        ga = [make_generator(r.seed + si) for r in reqs]
        gb = [make_generator(r.seed + si) for r in reqs]
        a = sample_scale(lc, lu, reqs, ga, si, 10)
        want = _loop_sample_scale(lc, lu, reqs, gb, si, 10)
        assert torch.equal(a, want)
        assert all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(ga, gb))
