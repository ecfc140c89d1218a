"""Reference loop images/s at batch 1 and 8, fp32 and bf16 (random weights of a named model).

    python -m benchmarks.reference_speed --model var-d16 --batches 1 8 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import best_of, machine, today
from engine.models.registry import build_model
from engine.reference import generate_reference
from engine.request import ImageRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="var-d16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, random_init=True)
    spec = model.spec
    rows = []
    for dtype in args.dtypes:
        for b in args.batches:
            reqs = [ImageRequest(class_label=i % spec.var.num_classes, seed=i, cfg=spec.default_cfg,
                                      top_k=spec.default_top_k, top_p=spec.default_top_p, request_id=str(i))
                    for i in range(b)]
            t = best_of(lambda reqs=reqs, dtype=dtype: generate_reference(model, reqs, dtype=dtype),
                        repeats=args.repeats, warmup=1)
            rows.append({"model": args.model, "dtype": dtype, "batch": b, "seconds": round(t, 3),
                         "images_per_s": round(b / t, 4)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {machine()}; date: {today()}\n")
    print("| model | dtype | batch | s/batch | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['seconds']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
