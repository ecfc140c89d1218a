"""Paged attention vs dense SDPA at VAR shapes (the last scales, CFG-doubled batch).

Dense: keys/values already contiguous ([history ; current], what the reference loop's torch.cat
builds). Paged: history gathered from a fragmented pool through block tables, then SDPA.

    python -m benchmarks.paged_attention --model var-d16 --batch 8 --block-size 16
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import best_of, machine, today
from engine.models.registry import get_spec
from memory.attention import paged_attention, write_kv
from memory.pool import KVPool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="var-d16")
    ap.add_argument("--batch", type=int, default=8, help="requests (x2 sequences with CFG)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_spec(args.model).var
    dtype = getattr(torch, args.dtype)
    s, h, d = 2 * args.batch, cfg.num_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    starts = cfg.scale_starts()
    for si in (cfg.num_scales - 2, cfg.num_scales - 1):
        lq, hist = cfg.scale_lengths()[si], starts[si]
        q = torch.randn(s, h, lq, d, generator=gen).to(dtype)
        k_cur, v_cur = torch.randn_like(q), torch.randn_like(q)
        k_hist = torch.randn(s, h, hist, d, generator=gen).to(dtype)
        v_hist = torch.randn_like(k_hist)
        pages_per_seq = -(-hist // args.block_size)
        pool = KVPool(2 * s * pages_per_seq, args.block_size, h, d, dtype)
        perm = torch.randperm(pool.num_pages, generator=gen).tolist()  # fragmented, shuffled layout
        pool.allocate(pool.num_pages)
        tables = [perm[i * pages_per_seq : (i + 1) * pages_per_seq] for i in range(s)]
        for i in range(s):
            write_kv(pool, tables[i], k_hist[i].transpose(0, 1), v_hist[i].transpose(0, 1))
        table = torch.tensor(tables, dtype=torch.int32)
        lens = torch.full((s,), hist, dtype=torch.int32)
        k_full, v_full = torch.cat((k_hist, k_cur), 2), torch.cat((v_hist, v_cur), 2)

        def dense(q=q, k_full=k_full, v_full=v_full):
            return F.scaled_dot_product_attention(q, k_full, v_full, scale=1.0)

        def paged(q=q, k_cur=k_cur, v_cur=v_cur, pool=pool, table=table, lens=lens):
            return paged_attention(q, k_cur, v_cur, pool, table, lens, 1.0, "torch")

        err = (dense().float() - paged().float()).abs().max().item()
        t_dense = best_of(dense, args.repeats)
        t_paged = best_of(paged, args.repeats)
        rows.append({"scale": si, "queries": lq, "history": hist, "seqs": s, "dense_ms": round(t_dense * 1e3, 2),
                     "paged_ms": round(t_paged * 1e3, 2), "ratio": round(t_paged / t_dense, 3), "max_abs_err": err})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {machine()}; date: {today()}; {args.model} shapes, {args.dtype}, block {args.block_size}\n")
    print("| scale | queries | history | seqs | dense ms | paged ms | paged/dense |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']} | {r['queries']} | {r['history']} | {r['seqs']} | {r['dense_ms']} | {r['paged_ms']} "
              f"| {r['ratio']} |")


if __name__ == "__main__":
    main()
