"""Paged attention for next-scale prediction: one interface, two backends.

At scale k a VAR layer attends from the scale's own tokens to themselves and to the layer's
kept history (earlier scales, stored in pool pages). There is no causal mask: the cache only
ever holds earlier scales, and tokens of one scale see each other. Sequences batched together
sit at the same scale (same number of query tokens) but may keep different amounts of history,
which is the only source of masking.

Backends:

- ``torch``: gather the pages into a dense ``[S, H, L, D]`` tensor, append the current tokens and
  call ``F.scaled_dot_product_attention``. Works everywhere; the reference and CPU path.
- ``xformers``: CUDA only. The gathered keys of all sequences are packed without padding and a
  ``BlockDiagonalMask`` keeps each sequence's queries on its own keys. Optional; never picked by
  ``auto`` (on VAR's shapes it only adds the packing copies to what SDPA does).
- ``varlen``: torch's own ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA) over keys packed
  without padding, for groups whose histories differ in length; SDPA everywhere else and
  wherever it is not available.
- ``flashinfer``: the runner's written path (current tokens stored in the pages first) reads the
  pool in place with FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper``: the pool's
  ``[pages, 2, block, heads, head_dim]`` tensor is exactly its NHD paged layout, so no gather at
  all. Optional extra (``pip install flashinfer-python``); bf16/fp16 on CUDA only, falls back to
  the torch path when not importable or for other dtypes.

``auto`` is ``torch`` (SDPA) on every device.

When every sequence of a group appends to the same history length, the runner writes the
current tokens into their pages before attention and reads [history; current] back with one
``index_select`` per K and V into a token-major buffer that SDPA takes as a strided view
(:func:`attend_paged_written`): one copy of the keys, as many as the reference loop's
``torch.cat``, instead of a gather plus a copy into a [history; current] buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memory.attention_backends import (
    BACKENDS,
    FlashInferPaged,
    _attention_varlen,
    _attention_xformers,
    flashinfer_available,
    resolve_backend,
    varlen_available,
    xformers_available,
)
from memory.pool import KVPool

__all__ = [
    "BACKENDS",
    "FlashInferPaged",
    "attend_paged_written",
    "dense_attention",
    "flashinfer_available",
    "gather_kv",
    "paged_attention",
    "resolve_backend",
    "varlen_available",
    "write_kv",
    "xformers_available",
]



# --------------------------------------------------------------------------- pool I/O
def write_kv(
    pool: KVPool,
    pages: Sequence[int] | torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int = 0,
) -> None:
    """Write ``k``, ``v`` (``[T, H, D]``) into consecutive token slots of a page list.

    Token ``t`` goes to slot ``start + t``: page ``pages[(start + t) // block_size]``, offset
    ``(start + t) % block_size``. One vectorised ``index_put_`` per tensor, no per-token loop,
    because a scale can write thousands of tokens per layer.
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    t, h, d = k.shape
    if (h, d) != (pool.num_heads, pool.head_dim):
        raise ValueError(
            f"k/v heads x head_dim {h}x{d} do not match the pool's {pool.num_heads}x{pool.head_dim}"
        )
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    bs = pool.block_size
    page_ids = torch.as_tensor(pages, dtype=torch.long).to(pool.device)
    if start + t > page_ids.numel() * bs:
        raise ValueError(
            f"writing {t} tokens at offset {start} needs {-(-(start + t) // bs)} pages of {bs} tokens, "
            f"the page list has {page_ids.numel()}"
        )
    if t == 0:
        return
    slots = torch.arange(start, start + t, device=pool.device)
    page_idx = page_ids[slots // bs]
    offsets = slots % bs
    kind = torch.zeros_like(offsets)
    pool.kv.index_put_((page_idx, kind, offsets), k.to(device=pool.device, dtype=pool.dtype))
    pool.kv.index_put_((page_idx, kind + 1, offsets), v.to(device=pool.device, dtype=pool.dtype))


def _lengths_list(lengths: torch.Tensor | Sequence[int]) -> list[int]:
    """Host copy of per-sequence lengths (one small device sync), needed for shapes."""
    if isinstance(lengths, torch.Tensor):
        return [int(x) for x in lengths.tolist()]
    return [int(x) for x in lengths]


def gather_kv(
    pool: KVPool,
    block_table: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather paged history into dense ``k``, ``v`` ``[S, H, Lmax, D]`` and a ``[S, Lmax]`` mask.

    ``mask[s, j]`` is True where slot ``j`` holds a real token of sequence ``s``. Padded slots are
    zeroed so that stale or never-written page contents can never leak NaN into a masked softmax.
    ``max_len`` (default: ``max(lengths)``) lets a caller fix the width.
    """
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [S, P], got shape {tuple(block_table.shape)}")
    s, p = block_table.shape
    lens = _lengths_list(lengths)
    if len(lens) != s:
        raise ValueError(f"lengths has {len(lens)} entries for a block table of {s} rows")
    bs = pool.block_size
    if any(n < 0 or n > p * bs for n in lens):
        raise ValueError(f"lengths {lens} exceed the block table capacity of {p} pages x {bs} tokens")
    lmax = max(lens, default=0) if max_len is None else int(max_len)
    if lmax < max(lens, default=0):
        raise ValueError(f"max_len={lmax} is shorter than the longest history {max(lens)}")
    h, d = pool.num_heads, pool.head_dim
    lens_t = torch.tensor(lens, dtype=torch.long, device=pool.device)
    mask = torch.arange(lmax, device=pool.device)[None, :] < lens_t[:, None]
    if lmax == 0:
        empty = pool.kv.new_zeros((s, h, 0, d))
        return empty, empty.clone(), mask
    n_pages = -(-lmax // bs)
    if n_pages > p:  # caller asked for more width than pages exist: pad with page 0, masked
        pad = block_table.new_zeros((s, n_pages - p))
        block_table = torch.cat([block_table, pad], dim=1)
    ids = block_table[:, :n_pages].reshape(-1).to(device=pool.device, dtype=torch.long)
    g = pool.kv.index_select(0, ids).view(s, n_pages, 2, bs, h, d)
    # [S, P, 2, bs, H, D] -> [2, S, H, P*bs, D]; the reshape makes the one copy we need anyway.
    g = g.permute(2, 0, 4, 1, 3, 5).reshape(2, s, h, n_pages * bs, d)[:, :, :, :lmax]
    if not all(n == lmax for n in lens):
        g = g.masked_fill(~mask[None, :, None, :, None], 0)
    return g[0], g[1], mask


def _gather_with_current(
    pool: KVPool, block_table: torch.Tensor, hist: int, k_cur: torch.Tensor, v_cur: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast path for equal history lengths: K/V ``[S, H, hist + Lq, D]`` with one copy of the
    history. Whole pages are indexed straight into a token-major buffer ``[S, width, H, D]``
    (``aten.index`` with ``out=`` a strided view: no intermediate gather tensor), the current
    tokens then overwrite the unused tail of the last page, and K/V are returned as strided
    ``[S, H, hist + Lq, D]`` views, which SDPA reads as they are (same numbers as contiguous)."""
    s, h, lq, d = k_cur.shape
    bs = pool.block_size
    n_pages = -(-hist // bs)
    if n_pages > block_table.shape[1]:
        raise ValueError(f"lengths {[hist] * s} exceed the block table capacity of {block_table.shape[1]} pages "
                         f"x {bs} tokens")
    ids = block_table[:, :n_pages].to(device=pool.device, dtype=torch.long)
    width = max(n_pages * bs, hist + lq)
    out = []
    for kind, cur in ((0, k_cur), (1, v_cur)):
        buf = cur.new_empty((s, width, h, d))
        src = pool.kv[:, kind]
        dst = buf[:, : n_pages * bs].unflatten(1, (n_pages, bs))
        if src.dtype == buf.dtype:
            torch.ops.aten.index.Tensor_out(src, [ids], out=dst)
        else:
            dst.copy_(src[ids])
        buf[:, hist : hist + lq].copy_(cur.transpose(1, 2))
        out.append(buf[:, : hist + lq].transpose(1, 2))
    return out[0], out[1]


def attend_paged_written(q: torch.Tensor, pool: KVPool, gather_ids: torch.Tensor, total: int,
                         scale: float) -> torch.Tensor:
    """Attention of ``q`` [S, H, Lq, D] over ``total`` tokens per sequence that are all in the
    pages already (history, then the current tokens written just before).

    ``gather_ids`` [S, n] (or flat): each sequence's first n = ceil(total / block) pages. One
    index per K and V lands them token-major ([S, n * block, H, D]); SDPA reads the
    first ``total`` tokens as a strided [S, H, total, D] view, so no second copy is made. Same
    numbers as SDPA over the contiguous [history; current] tensors (SDPA's kernels index by
    stride; ``tests/test_paged_attention.py`` checks equality)."""
    s, h, _lq, d = q.shape
    bs = pool.block_size
    ids = gather_ids.reshape(s, -1)
    n = ids.shape[1]
    # advanced indexing of whole pages: [S, n, bs, H, D], contiguous = token-major [S, n * bs, H, D]
    k = pool.kv[:, 0][ids].view(s, n * bs, h, d)[:, :total].transpose(1, 2)
    v = pool.kv[:, 1][ids].view(s, n * bs, h, d)[:, :total].transpose(1, 2)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference ``softmax(q k^T * scale) v`` in float32 math, returned in float32.

    Kept deliberately naive (no masks, no fused kernels) so tests compare the paged backends
    against something obviously right. Shapes ``[..., Lq, D]`` x ``[..., Lk, D]``.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.float())


def _attention_torch(
    q: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    hist_mask: torch.Tensor,
    equal: bool,
    scale: float,
) -> torch.Tensor:
    """SDPA over [history; current]; a boolean mask only when history lengths differ."""
    if k_hist.shape[2] == 0:
        k, v, attn_mask = k_cur, v_cur, None
    else:
        k = torch.cat([k_hist.to(q.dtype), k_cur], dim=2)
        v = torch.cat([v_hist.to(q.dtype), v_cur], dim=2)
        attn_mask = None
        if not equal:
            cur = hist_mask.new_ones((q.shape[0], q.shape[2]))
            attn_mask = torch.cat([hist_mask, cur], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def paged_attention(
    q: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    pool: KVPool,
    block_table: torch.Tensor,
    hist_lens: torch.Tensor | Sequence[int],
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention of the current scale's tokens over paged history plus themselves.

    ``q``, ``k_cur``, ``v_cur``: ``[S, H, Lq, D]``, S sequences at the same scale. Sequence ``s``
    attends to its ``hist_lens[s]`` history tokens (through row ``s`` of ``block_table``) followed
    by its ``Lq`` current tokens, with no causal mask. ``scale`` is the softmax scale (VAR passes
    1.0 because its q is already normalised and scaled). Returns ``[S, H, Lq, D]`` in q's dtype.
    """
    name = resolve_backend(backend, q.device)
    if q.dim() != 4 or k_cur.shape != q.shape or v_cur.shape != q.shape:
        raise ValueError(
            f"q, k_cur, v_cur must share one [S, H, Lq, D] shape, got {tuple(q.shape)}, "
            f"{tuple(k_cur.shape)}, {tuple(v_cur.shape)}"
        )
    s, h, _lq, d = q.shape
    if (h, d) != (pool.num_heads, pool.head_dim):
        raise ValueError(
            f"q heads x head_dim {h}x{d} do not match the pool's {pool.num_heads}x{pool.head_dim}"
        )
    if block_table.dim() != 2 or block_table.shape[0] != s:
        raise ValueError(f"block_table must be [S={s}, P], got shape {tuple(block_table.shape)}")
    hist = _lengths_list(hist_lens)
    if len(hist) != s:
        raise ValueError(f"hist_lens has {len(hist)} entries for {s} sequences")
    equal = all(n == hist[0] for n in hist)
    if name in ("torch", "varlen", "flashinfer") and equal and hist[0] > 0:
        k, v = _gather_with_current(pool, block_table, hist[0], k_cur, v_cur)
        return F.scaled_dot_product_attention(q, k, v, scale=scale).to(q.dtype)
    k_hist, v_hist, hist_mask = gather_kv(pool, block_table, hist)
    k_hist, v_hist, hist_mask = k_hist.to(q.device), v_hist.to(q.device), hist_mask.to(q.device)

    if name == "varlen" and not equal:
        out = _attention_varlen(q, k_cur, v_cur, k_hist, v_hist, hist_mask, hist, scale)
    elif name == "xformers":
        if q.device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' needs CUDA tensors, got device {q.device}")
        if not xformers_available():
            raise ValueError("attention backend 'xformers' requested but xformers is not importable")
        out = _attention_xformers(q, k_cur, v_cur, k_hist, v_hist, hist_mask, hist, equal, scale)
    else:
        out = _attention_torch(q, k_cur, v_cur, k_hist, v_hist, hist_mask, equal, scale)
    return out.to(q.dtype)
