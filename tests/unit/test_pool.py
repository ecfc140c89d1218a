"""KVPool and PageTable: allocation bookkeeping, sizing, stats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.page_table import PageTable
from memory.pool import KVPool, PoolExhaustedError


def small_pool(num_pages: int = 8, block_size: int = 4) -> KVPool:
    return KVPool(num_pages, block_size, num_heads=2, head_dim=4)


def test_shape_dtype_and_page_bytes() -> None:
    pool = KVPool(5, 4, 3, 8, dtype=torch.float16)
    assert pool.kv.shape == (5, 2, 4, 3, 8)
    assert pool.kv.dtype == torch.float16
    assert pool.page_bytes == 2 * 4 * 3 * 8 * 2
    assert pool.total_bytes == 5 * pool.page_bytes


def test_unwritten_pages_never_reach_a_gather() -> None:
    """The pool is left uninitialised (torch.empty): fill it with NaN and check that a masked
    gather of unequal histories returns finite values with zeros in the padded slots."""
    from memory.attention import gather_kv, write_kv

    pool = KVPool(6, 4, num_heads=2, head_dim=4)
    pool.kv.fill_(float("nan"))
    a, b = pool.allocate(2), pool.allocate(1)
    write_kv(pool, a, torch.ones(6, 2, 4), torch.ones(6, 2, 4))
    write_kv(pool, b, torch.ones(3, 2, 4), torch.ones(3, 2, 4))
    k, v, mask = gather_kv(pool, torch.tensor([a, b + [0]]), [6, 3])
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert mask.sum().item() == 9 and k[1, :, 3:].abs().sum() == 0


def test_allocate_free_round_trip() -> None:
    pool = small_pool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and all(0 <= p < 8 for p in a + b)
    assert pool.num_free == 0 and pool.num_used == 8 and pool.usage == 1.0
    pool.free(a)
    assert pool.num_free == 3
    c = pool.allocate(3)
    assert sorted(c) == sorted(a)
    pool.free(b + c)
    assert pool.num_free == 8 and pool.num_used == 0
    assert pool.allocate(0) == []


def test_exhaustion_allocates_nothing() -> None:
    pool = small_pool(4)
    held = pool.allocate(3)
    with pytest.raises(PoolExhaustedError, match="requested 2 pages but only 1"):
        pool.allocate(2)
    assert isinstance(PoolExhaustedError("x"), MemoryError)
    assert pool.num_free == 1 and pool.num_used == 3
    assert [pool.is_allocated(p) for p in held] == [True] * 3
    assert len(pool.allocate(1)) == 1


def test_double_free_and_bad_ids_raise_without_side_effects() -> None:
    pool = small_pool(4)
    pages = pool.allocate(2)
    pool.free([pages[0]])
    with pytest.raises(ValueError, match="double free"):
        pool.free([pages[0]])
    with pytest.raises(ValueError, match="double free"):
        pool.free([pages[1], pages[1]])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([pages[1], 4])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([-1])
    # none of the failed calls freed pages[1]
    assert pool.is_allocated(pages[1]) and pool.num_free == 3
    pool.free([pages[1]])
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_from_bytes_sizing_and_error() -> None:
    page = KVPool.bytes_per_page(4, 2, 8, torch.float32)
    pool = KVPool.from_bytes(10 * page + page - 1, 4, 2, 8, torch.float32, "cpu")
    assert pool.num_pages == 10 and pool.page_bytes == page
    with pytest.raises(ValueError, match="kv_pool_bytes"):
        KVPool.from_bytes(page - 1, 4, 2, 8, torch.float32, "cpu")


def test_from_gpu_memory_validates() -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        KVPool.from_gpu_memory(0.0, 4, 2, 8)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        KVPool.from_gpu_memory(1.5, 4, 2, 8)
    with pytest.raises(ValueError, match="CUDA"):
        KVPool.from_gpu_memory(0.5, 4, 2, 8, device="cpu")


def test_stats_and_peak() -> None:
    pool = small_pool(10)
    a = pool.allocate(6)
    pool.free(a[:4])
    b = pool.allocate(1)
    st_ = pool.stats()
    assert st_ == {
        "num_pages": 10,
        "free": 7,
        "used": 3,
        "usage": 0.3,
        "page_bytes": pool.page_bytes,
        "total_bytes": 10 * pool.page_bytes,
        "peak_used": 6,
    }
    pool.reset_peak()
    assert pool.peak_used == 3
    pool.free(a[4:] + b)
    assert pool.peak_used == 3 and pool.num_used == 0


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_random_alloc_free_keeps_invariants(ops: list[tuple[bool, int]]) -> None:
    pool = small_pool(12)
    held: list[list[int]] = []
    peak = 0
    for is_alloc, n in ops:
        if is_alloc:
            if n > pool.num_free:
                with pytest.raises(PoolExhaustedError):
                    pool.allocate(n)
            else:
                held.append(pool.allocate(n))
        elif held:
            pool.free(held.pop(n % len(held)))
        flat = [p for h in held for p in h]
        assert len(flat) == len(set(flat)) == pool.num_used
        assert pool.num_used + pool.num_free == 12
        peak = max(peak, pool.num_used)
        assert pool.peak_used == peak
    for h in held:
        pool.free(h)
    assert pool.num_free == 12


# ---------------------------------------------------------------------- page table
def test_page_table_basics() -> None:
    pt = PageTable(block_size=4)
    assert pt.pages(0, 0) == [] and pt.num_tokens(0, 0) == 0
    pt.append_pages(0, 0, [3, 1])
    pt.append_pages(0, 1, [5])
    pt.append_pages(1, 0, [2])
    pt.set_num_tokens(0, 0, 7)
    pt.set_num_tokens(0, 1, 4)
    with pytest.raises(ValueError, match="num_tokens=9"):
        pt.set_num_tokens(0, 0, 9)
    pt.pages(0, 0).append(99)  # a copy: the table is unaffected
    assert pt.pages(0, 0) == [3, 1] and pt.num_tokens(0, 0) == 7
    assert pt.num_pages(0) == 3 and pt.sequences() == [0, 1]

    table, lens = pt.block_table_tensor([1, 0, 7], layer=0)
    assert table.tolist() == [[2, 0], [3, 1], [0, 0]]
    assert lens.tolist() == [0, 7, 0]

    with pytest.raises(ValueError, match="lower num_tokens"):
        pt.trim_pages(0, 0, 1)
    pt.set_num_tokens(0, 0, 4)
    assert pt.trim_pages(0, 0, 1) == [1]

    assert sorted(pt.remove_sequence(0)) == [3, 5]
    assert pt.remove_sequence(0) == []
    assert pt.sequences() == [1]


def test_page_table_with_pool_returns_every_page() -> None:
    pool = small_pool(16)
    pt = PageTable(pool.block_size)
    for seq in range(3):
        for layer in range(2):
            pt.append_pages(seq, layer, pool.allocate(seq + 1))
    assert pool.num_used == 2 * (1 + 2 + 3)
    for seq in pt.sequences():
        pool.free(pt.remove_sequence(seq))
    assert pool.num_free == 16 and len(pt) == 0
