"""Paged attention equals dense attention over the same tokens, whatever the page layout."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.attention import (
    dense_attention,
    gather_kv,
    paged_attention,
    resolve_backend,
    write_kv,
    xformers_available,
)
from memory.page_table import PageTable
from memory.pool import KVPool

TOL = 1e-5


def fragmented_pool(rng: random.Random, num_pages: int, block_size: int, heads: int, head_dim: int) -> KVPool:
    """A pool whose free list has been shuffled by allocating everything and freeing a random half."""
    pool = KVPool(num_pages, block_size, heads, head_dim)
    pages = pool.allocate(num_pages)
    rng.shuffle(pages)
    pool.free(pages[: num_pages // 2])
    # Scribble over free pages so stale contents are present in unused slots.
    pool.kv.normal_(generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    return pool


def build_histories(
    rng: random.Random,
    gen: torch.Generator,
    pool: KVPool,
    table: PageTable,
    hist_lens: list[int],
    layer: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write random history for each sequence (in random chunks) through the page table."""
    h, d = pool.num_heads, pool.head_dim
    out = []
    for seq, n in enumerate(hist_lens):
        pages = pool.allocate(pool.pages_for(n))
        rng.shuffle(pages)
        table.append_pages(seq, layer, pages)
        k = torch.randn(n, h, d, generator=gen)
        v = torch.randn(n, h, d, generator=gen)
        start = 0
        while start < n:  # write in chunks to exercise `start` offsets inside pages
            step = rng.randint(1, n - start)
            write_kv(pool, table.pages(seq, layer), k[start : start + step], v[start : start + step], start)
            start += step
        table.set_num_tokens(seq, layer, n)
        out.append((k, v))
    return out


@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(1, 3),
    h=st.integers(1, 4),
    d=st.sampled_from([8, 16, 32]),
    lq=st.integers(1, 40),
    block_size=st.integers(1, 16),
    hist=st.lists(st.integers(0, 100), min_size=3, max_size=3),
    equal_hist=st.booleans(),
    unit_scale=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_equals_dense(
    s: int,
    h: int,
    d: int,
    lq: int,
    block_size: int,
    hist: list[int],
    equal_hist: bool,
    unit_scale: bool,
    seed: int,
) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hist_lens = [hist[0]] * s if equal_hist else hist[:s]
    need = sum(-(-n // block_size) for n in hist_lens)
    pool = fragmented_pool(rng, 2 * need + 8, block_size, h, d)
    table = PageTable(block_size)
    histories = build_histories(rng, gen, pool, table, hist_lens)

    q = torch.randn(s, h, lq, d, generator=gen)
    k_cur = torch.randn(s, h, lq, d, generator=gen)
    v_cur = torch.randn(s, h, lq, d, generator=gen)
    scale = 1.0 if unit_scale else d**-0.5
    block_table, lens = table.block_table_tensor(list(range(s)), layer=0)
    assert lens.tolist() == hist_lens

    out = paged_attention(q, k_cur, v_cur, pool, block_table, lens, scale, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    for i, (k_h, v_h) in enumerate(histories):
        k = torch.cat([k_h.transpose(0, 1), k_cur[i]], dim=1)
        v = torch.cat([v_h.transpose(0, 1), v_cur[i]], dim=1)
        ref = dense_attention(q[i], k, v, scale)
        err = (out[i] - ref).abs().max().item()
        assert err < TOL, f"sequence {i}: max abs err {err}"


@settings(max_examples=25, deadline=None)
@given(
    block_size=st.integers(1, 16),
    lens=st.lists(st.integers(0, 60), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_write_then_gather_is_exact(block_size: int, lens: list[int], seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    h, d = 2, 8
    need = sum(-(-n // block_size) for n in lens)
    pool = fragmented_pool(rng, 2 * need + 4, block_size, h, d)
    table = PageTable(block_size)
    histories = build_histories(rng, gen, pool, table, lens)
    block_table, lengths = table.block_table_tensor(list(range(len(lens))), layer=0)

    k, v, mask = gather_kv(pool, block_table, lengths)
    lmax = max(lens)
    assert k.shape == v.shape == (len(lens), h, lmax, d)
    assert mask.shape == (len(lens), lmax) and mask.dtype == torch.bool
    for i, (k_w, v_w) in enumerate(histories):
        n = lens[i]
        assert mask[i].tolist() == [True] * n + [False] * (lmax - n)
        assert torch.equal(k[i, :, :n], k_w.transpose(0, 1))
        assert torch.equal(v[i, :, :n], v_w.transpose(0, 1))
        assert torch.count_nonzero(k[i, :, n:]) == 0 and torch.count_nonzero(v[i, :, n:]) == 0


def test_no_history_is_self_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(4, 4, 2, 8)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(3))
    table = torch.zeros((2, 0), dtype=torch.int32)
    out = paged_attention(q, k, v, pool, table, [0, 0], scale=1.0)
    assert (out - dense_attention(q, k, v, 1.0)).abs().max().item() < TOL


def test_low_precision_pool_upcasts_to_query_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    pool = KVPool(8, 4, 2, 8, dtype=torch.bfloat16)
    table = PageTable(4)
    pages = pool.allocate(3)
    table.append_pages(0, 0, pages)
    k_h, v_h = torch.randn(10, 2, 8, generator=gen), torch.randn(10, 2, 8, generator=gen)
    write_kv(pool, pages, k_h, v_h)
    table.set_num_tokens(0, 0, 10)
    q, k_c, v_c = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    bt, lens = table.block_table_tensor([0], 0)
    out = paged_attention(q, k_c, v_c, pool, bt, lens, scale=0.35)
    k = torch.cat([k_h.bfloat16().float().transpose(0, 1), k_c[0]], dim=1)
    v = torch.cat([v_h.bfloat16().float().transpose(0, 1), v_c[0]], dim=1)
    assert out.dtype == torch.float32
    assert (out[0] - dense_attention(q[0], k, v, 0.35)).abs().max().item() < TOL


def test_argument_errors() -> None:
    pool = KVPool(2, 4, 2, 8)
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="flash-magic"):
        paged_attention(
            q, q, q, pool, torch.zeros((1, 0), dtype=torch.int32), [0], 1.0, backend="flash-magic"
        )
    with pytest.raises(ValueError, match="capacity"):
        paged_attention(q, q, q, pool, torch.zeros((1, 1), dtype=torch.int32), [5], 1.0)
    with pytest.raises(ValueError, match="pages"):
        write_kv(pool, [0], torch.zeros(5, 2, 8), torch.zeros(5, 2, 8))
    assert resolve_backend("auto", "cpu") == "torch"


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers backend needs a CUDA GPU; CI is CPU-only")
@pytest.mark.parametrize("hist_lens", [[0, 0], [17, 17], [0, 33, 5], [64, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_xformers_matches_torch(hist_lens: list[int], dtype: torch.dtype) -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    s, h, lq, d, bs = len(hist_lens), 4, 13, 32, 8
    pool = KVPool(64, bs, h, d, dtype=dtype, device="cuda")
    table = PageTable(bs)
    for seq, n in enumerate(hist_lens):
        pages = pool.allocate(pool.pages_for(n))
        rng.shuffle(pages)
        table.append_pages(seq, 0, pages)
        write_kv(pool, pages, torch.randn(n, h, d, generator=gen), torch.randn(n, h, d, generator=gen))
        table.set_num_tokens(seq, 0, n)
    q, k, v = (torch.randn(s, h, lq, d, generator=gen).to("cuda", dtype) for _ in range(3))
    bt, lens = table.block_table_tensor(list(range(s)), 0, device="cuda")
    ref = paged_attention(q, k, v, pool, bt, lens, 1.0, backend="torch")
    out = paged_attention(q, k, v, pool, bt, lens, 1.0, backend="xformers")
    assert resolve_backend("auto", "cuda") == "xformers"
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (out.float() - ref.float()).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_written_pages_is_bit_identical_to_sdpa_over_cat(dtype: torch.dtype) -> None:
    """The runner's written path: current tokens stored in the pages first, [history; current]
    read back as a strided token-major view. Must equal SDPA over the reference loop's contiguous
    ``torch.cat`` exactly (not just closely): the engine == reference contract depends on it."""
    import torch.nn.functional as F

    from memory.attention import _gather_with_current, attend_paged_written

    rng = random.Random(3)
    s, h, d, bs, hist, lq = 3, 2, 16, 4, 13, 9
    pool = fragmented_pool(rng, 64, bs, h, d)
    pool.kv = pool.kv.to(dtype)
    pool.dtype = dtype
    gen = torch.Generator().manual_seed(0)
    kh, vh, kc, vc = (torch.randn(s, h, n, d, generator=gen).to(dtype) for n in (hist, hist, lq, lq))
    q = torch.randn(s, h, lq, d, generator=gen).to(dtype)
    table = []
    for i in range(s):
        pages = pool.allocate(-(-(hist + lq) // bs))
        k_all, v_all = torch.cat([kh[i], kc[i]], 1), torch.cat([vh[i], vc[i]], 1)
        write_kv(pool, pages, k_all.transpose(0, 1), v_all.transpose(0, 1))
        table.append(pages)
    want = F.scaled_dot_product_attention(q, torch.cat([kh, kc], 2), torch.cat([vh, vc], 2), scale=0.3)
    got = attend_paged_written(q, pool, torch.tensor(table), hist + lq, 0.3)
    assert torch.equal(got, want)
    k, v = _gather_with_current(pool, torch.tensor(table), hist, kc, vc)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, scale=0.3), want)
