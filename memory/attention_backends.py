"""The optional attention backends (xformers, torch varlen, FlashInfer) and which one runs.

Kept apart from ``attention.py`` (the gather + SDPA path every device has) because each of
these imports an optional library or a CUDA-only kernel, and each falls back cleanly: an
unavailable backend is never picked by ``auto`` and degrades to SDPA where it was asked for.
"""

from __future__ import annotations

import itertools

import torch

from memory.pool import KVPool

BACKENDS = ("auto", "torch", "xformers", "varlen", "flashinfer")


# ------------------------------------------------------------------------ backends
def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports (checked lazily; xformers is an optional CUDA extra)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import time
        return False
    return True


def flashinfer_available() -> bool:
    """Whether ``flashinfer`` imports (an optional CUDA extra)."""
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def varlen_available(device: torch.device | str) -> bool:
    """Whether torch's ``varlen_attn`` exists here and can run on ``device`` (CUDA only)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map a backend name to the one that will run. ``auto`` is SDPA (``torch``) everywhere;
    ``flashinfer`` and ``varlen`` fall back to ``torch`` where they cannot run (not importable,
    not CUDA), so a config naming them still serves."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "torch"
    if backend == "flashinfer" and not (torch.device(device).type == "cuda" and flashinfer_available()):
        return "torch"
    if backend == "varlen" and not varlen_available(device):
        return "torch"
    return backend


class FlashInferPaged:
    """FlashInfer's paged prefill over the pool, in place (no gather).

    Written against FlashInfer's documented API: ``BatchPrefillWithPagedKVCacheWrapper(workspace,
    kv_layout="NHD")``, ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices,
    paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, causal=False,
    sm_scale=..., q_data_type=..., kv_data_type=...)`` then ``run(q [nnz, H, D], kv_cache)`` with
    ``kv_cache`` [max_pages, 2, page_size, H, D] (NHD), which is ``KVPool.kv`` as it is. Index
    tensors are int32; ``plan`` takes them on the host (it copies them to the device itself).
    Older FlashInfer versions name the two calls ``begin_forward`` / ``forward``.
    """

    WORKSPACE_BYTES = 128 << 20
    HEAD_DIMS = (64, 128, 256)

    def __init__(self, wrapper) -> None:
        self.wrapper = wrapper

    @classmethod
    def create(cls, device: torch.device, pool: KVPool) -> FlashInferPaged | None:
        """A wrapper on ``device``, or None where FlashInfer cannot run (the runner then uses SDPA)."""
        if torch.device(device).type != "cuda" or not flashinfer_available():
            return None
        if pool.head_dim not in cls.HEAD_DIMS or pool.dtype not in (torch.float16, torch.bfloat16):
            return None
        import flashinfer

        workspace = torch.empty(cls.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return cls(flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD"))

    def supports(self, q: torch.Tensor) -> bool:
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in self.HEAD_DIMS

    def attend(self, q: torch.Tensor, pool: KVPool, meta: tuple, scale: float) -> torch.Tensor:
        """q [S, H, Lq, D]; ``meta`` = host int32 (qo_indptr [S+1], kv_indptr [S+1] in pages,
        kv_indices [sum pages], last_page_len [S]). Returns [S, H, Lq, D]."""
        s, h, lq, d = q.shape
        qo_indptr, kv_indptr, kv_indices, last_len = meta
        w = self.wrapper
        kw = dict(causal=False, sm_scale=float(scale), q_data_type=q.dtype, kv_data_type=pool.dtype)
        if hasattr(w, "plan"):
            w.plan(qo_indptr, kv_indptr, kv_indices, last_len, h, pool.num_heads, d, pool.block_size, **kw)
            run = w.run
        else:  # FlashInfer < 0.2
            w.begin_forward(qo_indptr, kv_indptr, kv_indices, last_len, h, pool.num_heads, d, pool.block_size)
            run = w.forward
        packed = q.transpose(1, 2).reshape(s * lq, h, d)
        out = run(packed, pool.kv) if hasattr(w, "plan") else run(packed, pool.kv, causal=False, sm_scale=float(scale))
        return out.view(s, lq, h, d).transpose(1, 2)


def _attention_xformers(
    q: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    hist_mask: torch.Tensor,
    hist: list[int],
    equal: bool,
    scale: float,
) -> torch.Tensor:
    """xformers memory-efficient attention (BMHK layout).

    Equal history: a plain batch, no bias. Otherwise all sequences are packed into one batch row
    without padding and ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)`` confines each
    sequence's queries to its own keys, so no padded slot is ever read.
    """
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    s, h, lq, d = q.shape
    k = torch.cat([k_hist.to(q.dtype), k_cur], dim=2)  # [S, H, Lh + Lq, D]
    v = torch.cat([v_hist.to(q.dtype), v_cur], dim=2)
    if equal:
        out = xops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(),
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
            scale=scale,
        )  # [S, Lq, H, D]
        return out.transpose(1, 2)
    valid = torch.cat([hist_mask, hist_mask.new_ones((s, lq))], dim=1)  # [S, Lh + Lq]
    k_packed = k.transpose(1, 2)[valid].unsqueeze(0)  # [1, sum(kv), H, D]
    v_packed = v.transpose(1, 2)[valid].unsqueeze(0)
    q_packed = q.transpose(1, 2).reshape(1, s * lq, h, d)
    bias = BlockDiagonalMask.from_seqlens(q_seqlen=[lq] * s, kv_seqlen=[n + lq for n in hist])
    out = xops.memory_efficient_attention(q_packed, k_packed, v_packed, attn_bias=bias, scale=scale)
    return out.reshape(s, lq, h, d).transpose(1, 2)


def _attention_varlen(
    q: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    k_hist: torch.Tensor,
    v_hist: torch.Tensor,
    hist_mask: torch.Tensor,
    hist: list[int],
    scale: float,
) -> torch.Tensor:
    """Unequal histories with torch's ``varlen_attn``: keys of all sequences packed without
    padding ([sum(kv), H, D]) and cumulative lengths; queries packed [S * Lq, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    s, h, lq, d = q.shape
    k = torch.cat([k_hist.to(q.dtype), k_cur], dim=2).transpose(1, 2)  # [S, Lh + Lq, H, D]
    v = torch.cat([v_hist.to(q.dtype), v_cur], dim=2).transpose(1, 2)
    valid = torch.cat([hist_mask, hist_mask.new_ones((s, lq))], dim=1)
    lens = [n + lq for n in hist]
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32).to(q.device, non_blocking=True)
    cu_q = torch.arange(0, (s + 1) * lq, lq, dtype=torch.int32).to(q.device, non_blocking=True)
    out = varlen_attn(q.transpose(1, 2).reshape(s * lq, h, d), k[valid], v[valid], cu_q, cu_k, lq, max(lens),
                      scale=scale)
    return out.view(s, lq, h, d).transpose(1, 2)


