"""Training step throughput of a VAR transformer: all scales vs a coarse prefix.

    python -m benchmarks.train_speed --model var-tiny --batch-size 16 --scales 10 8 7 --threads 2

A scale never attends to a finer one, so training on the first K scales is exact for those
positions; this measures how much cheaper such a step is (forward + backward + AdamW, random
weights and tokens, the dtype ``auto`` picks unless given).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import best_of, machine, today
from engine.models.registry import get_spec
from engine.models.var import VAR
from engine.precision import DTYPES, autocast_for, resolve_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="var-tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--scales", type=int, nargs="+", default=None, help="prefix lengths K (default: all, then K-2)")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_spec(args.model).var
    dtype = resolve_dtype(args.dtype, "cpu")
    var = VAR(cfg).train()
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4)
    b, gen = args.batch_size, torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=gen)
    inputs = torch.randn(b, cfg.seq_len - 1, cfg.z_channels, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)

    def step(k: int) -> None:
        n = sum(cfg.scale_lengths()[:k])
        with autocast_for(dtype, "cpu"):
            logits = var(labels, inputs, num_scales=k)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets[:, :n].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"machine: {machine()}; date: {today()}; {args.model}, batch {b}, {dtype}\n")
    print("| scales | tokens | s/step | images/s | vs all scales |\n|---|---|---|---|---|")
    full = None
    for k in args.scales or [cfg.num_scales, cfg.num_scales - 2]:
        t = best_of(lambda k=k: step(k), repeats=args.repeats, warmup=1)
        full = full or t
        print(f"| {k} | {sum(cfg.scale_lengths()[:k])} | {t:.2f} | {b / t:.2f} | {full / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
