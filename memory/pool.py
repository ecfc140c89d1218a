"""The KV page pool: one preallocated tensor of fixed-size pages and an O(1) free list.

Every layer of a VAR model has the same KV shape (heads x head_dim), so a single pool serves
all layers of a model: a page holds ``block_size`` tokens of K and V for one (sequence, layer)
and which layer owns it is recorded only in the page table. Preallocating once means the
serving loop never calls the allocator of the device, and the number of free pages is an exact,
cheap measure of how much more work a worker can admit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["KVPool", "PoolExhaustedError"]


class PoolExhaustedError(MemoryError):
    """Raised when an allocation asks for more pages than are free.

    A ``MemoryError`` subclass so generic out-of-memory handling catches it, but distinct so the
    scheduler can tell "this pool is full, queue or preempt" from a real host OOM.
    """


def _positive_int(name: str, value: int) -> int:
    """Validate a sizing argument early, naming it, rather than failing later inside torch."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KVPool:
    """A preallocated tensor of KV pages shared by all layers, plus a free list.

    ``kv`` has shape ``[num_pages, 2, block_size, num_heads, head_dim]``; index 0 of dim 1 is K,
    index 1 is V. Keeping K and V of a page adjacent means one ``index_select`` over dim 0 gathers
    both for a block table.

    The free list is a stack (allocate and free are O(1) per page) and an ``allocated`` bytearray
    makes double frees and foreign ids detectable, which is what lets us keep the contract that
    every page taken is returned exactly once.
    """

    def __init__(
        self,
        num_pages: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_pages = _positive_int("num_pages", num_pages)
        self.block_size = _positive_int("block_size", block_size)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        # Left uninitialised (touched lazily: zero-filling 1 GiB cost ~1 s per engine). Nothing
        # reads a slot before writing it: attention slices each history to its length, and the
        # masked gather (``gather_kv``) zeroes padded slots itself, so stale or NaN contents of
        # never-written pages cannot reach a softmax.
        self.kv = torch.empty(
            (num_pages, 2, block_size, num_heads, head_dim), dtype=dtype, device=self.device
        )
        # Reversed so the first allocations hand out low page ids (nicer to read in debugging).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated = bytearray(num_pages)
        self._peak_used = 0

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def bytes_per_page(block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page (K and V), computed without building a pool, for sizing decisions."""
        return 2 * block_size * num_heads * head_dim * dtype.itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: ``2 * block_size * num_heads * head_dim * element_size``."""
        return self.bytes_per_page(self.block_size, self.num_heads, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole preallocated pool."""
        return self.num_pages * self.page_bytes

    @classmethod
    def from_bytes(
        cls,
        kv_pool_bytes: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVPool:
        """Build the largest pool that fits in ``kv_pool_bytes`` (the CPU sizing knob).

        Raises ValueError when the budget does not hold a single page, since a pool with zero
        pages could never admit anything and would only fail later, less clearly.
        """
        page_bytes = cls.bytes_per_page(
            _positive_int("block_size", block_size),
            _positive_int("num_heads", num_heads),
            _positive_int("head_dim", head_dim),
            dtype,
        )
        num_pages = int(kv_pool_bytes) // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"kv_pool_bytes={kv_pool_bytes} is smaller than one KV page ({page_bytes} bytes for "
                f"block_size={block_size}, num_heads={num_heads}, head_dim={head_dim}, dtype={dtype})"
            )
        return cls(num_pages, block_size, num_heads, head_dim, dtype=dtype, device=device)

    @classmethod
    def from_gpu_memory(
        cls,
        gpu_memory_utilization: float,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cuda",
    ) -> KVPool:
        """Size the pool as a fraction of the GPU memory that is free right now (the CUDA knob).

        Call it after the model weights are loaded so they are not counted as free. CUDA only:
        on CPU there is no meaningful "free device memory", use :meth:`from_bytes` instead.
        """
        util = float(gpu_memory_utilization)
        if not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(
                f"from_gpu_memory needs a CUDA device, got {dev}; use KVPool.from_bytes(kv_pool_bytes, ...)"
            )
        if not torch.cuda.is_available():
            raise ValueError("from_gpu_memory needs CUDA but torch.cuda.is_available() is False")
        free_bytes, _total = torch.cuda.mem_get_info(dev)
        return cls.from_bytes(int(free_bytes * util), block_size, num_heads, head_dim, dtype, dev)

    # ------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages; all or nothing, so a failed admission leaves the pool untouched."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of pages to allocate must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise PoolExhaustedError(
                f"KV pool exhausted: requested {n} pages but only {len(self._free)} of "
                f"{self.num_pages} are free ({self.page_bytes} bytes each)"
            )
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()  # pop order: lowest ids first on a fresh pool
        for p in pages:
            self._allocated[p] = 1
        used = self.num_pages - len(self._free)
        if used > self._peak_used:
            self._peak_used = used
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool; validates everything before changing anything.

        Out-of-range ids, pages that are not allocated (double free) and duplicates within the
        call raise ValueError, because each of them means some owner's bookkeeping is wrong and
        silently accepting it would hand the same page to two sequences later.
        """
        pages = list(pages)
        seen: set[int] = set()
        for p in pages:
            if isinstance(p, bool) or not isinstance(p, int):
                raise ValueError(f"page ids must be ints, got {p!r}")
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page id {p} out of range [0, {self.num_pages})")
            if not self._allocated[p] or p in seen:
                raise ValueError(f"double free of page {p}: it is not allocated")
            seen.add(p)
        for p in pages:
            self._allocated[p] = 0
        self._free.extend(reversed(pages))

    def is_allocated(self, page: int) -> bool:
        """Whether ``page`` is currently handed out (for assertions in callers and tests)."""
        return bool(self._allocated[page])

    # ------------------------------------------------------------------ stats
    @property
    def num_free(self) -> int:
        """Pages available to :meth:`allocate`."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages currently allocated."""
        return self.num_pages - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages in use, in [0, 1]."""
        return self.num_used / self.num_pages

    @property
    def peak_used(self) -> int:
        """Highest number of pages in use since creation or the last :meth:`reset_peak`."""
        return self._peak_used

    def reset_peak(self) -> None:
        """Restart peak tracking from the current usage (e.g. at the start of a benchmark)."""
        self._peak_used = self.num_used

    def stats(self) -> dict[str, int | float]:
        """A plain dict snapshot for telemetry and result stats."""
        return {
            "num_pages": self.num_pages,
            "free": self.num_free,
            "used": self.num_used,
            "usage": self.usage,
            "page_bytes": self.page_bytes,
            "total_bytes": self.total_bytes,
            "peak_used": self._peak_used,
        }

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens of one (sequence, layer)."""
        return -(-num_tokens // self.block_size)

    def __repr__(self) -> str:
        return (
            f"KVPool(num_pages={self.num_pages}, block_size={self.block_size}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, used={self.num_used})"
        )
