"""Paged Infinity engine vs the Infinity reference loop (random init), images/s on this machine.

Two loads of ``--batch`` requests: ``same`` (all 1:1, one schedule: the reference runs one
batch) and ``mixed`` (half 1:1, half 2:1: the reference runs one batch per schedule, the engine
mixes both in every step). Prompts are encoded by a stand-in encoder (seeded random states of
``--text-tokens`` tokens, cached, outside the timing), so both paths read the same texts and
the figure is the transformer + tokenizer; the engine's tokens are checked against the
reference's. ``--depth`` builds a reduced-depth variant with the model's width (Infinity-2B in
fp32 is ~9 GB of weights and ~45 s an image on 2 cores).

    python -m benchmarks.infinity_speed --model infinity-micro --batch 8
    python -m benchmarks.infinity_speed --model infinity-2b --depth 4 --resolution 0.06M --batch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zlib

import torch

from benchmarks.common import best_of, machine, today
from engine.config import EngineConfig
from engine.infinity_engine import InfinityEngine
from engine.infinity_reference import TextImageRequest, generate_infinity_reference
from engine.infinity_runner import pack_bits
from engine.models.bsq import BSQTokenizer
from engine.models.catalog import get_infinity_spec
from engine.models.infinity import Infinity
from engine.models.registry import LoadedInfinity
from engine.request import ImageRequest


class StandInEncoder:
    """Prompt -> seeded random encoder states [T, C] (the same for a prompt every time)."""

    def __init__(self, channels: int, tokens: int) -> None:
        self.channels, self.tokens = channels, tokens
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for p in prompts:
            if p not in self._cache:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                self._cache[p] = torch.randn(self.tokens, self.channels, generator=g) * 0.2
            out.append(self._cache[p])
        return out


def build(name: str, depth: int | None, seed: int = 0) -> LoadedInfinity:
    spec = get_infinity_spec(name)
    if depth is not None:
        chunks = next(c for c in (spec.model.block_chunks, 4, 2, 1) if depth % c == 0)
        spec = dataclasses.replace(spec, name=f"{name}-d{depth}",
                                   model=dataclasses.replace(spec.model, depth=depth, block_chunks=chunks))
    torch.manual_seed(seed)
    model, tok = Infinity(spec.model).eval(), BSQTokenizer(spec.tokenizer).eval()
    for p in list(model.parameters()) + list(tok.parameters()):
        p.requires_grad_(False)
    return LoadedInfinity(spec=spec, model=model, tokenizer=tok, source="random-init")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="infinity-micro")
    ap.add_argument("--depth", type=int, default=None, help="reduced depth (default: the model's)")
    ap.add_argument("--resolution", default=None, help="named resolution (default: the model's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loads", nargs="+", default=["same", "mixed"], choices=["same", "mixed"])
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-pool-bytes", type=int, default=1 << 30)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = build(args.model, args.depth)
    cfg = loaded.spec.model
    encoder = StandInEncoder(cfg.text_channels, min(args.text_tokens, cfg.text_maxlen))
    engine = InfinityEngine(loaded, EngineConfig(dtype="float32", kv_pool_bytes=args.kv_pool_bytes),
                            text_encoder=encoder)
    rows = []
    for load in args.loads:
        ratios = [1.0] * args.batch if load == "same" else [1.0 if i % 2 == 0 else 2.0 for i in range(args.batch)]
        reqs = [ImageRequest(prompt=f"prompt {i}", seed=i, h_div_w=r, resolution=args.resolution,
                             request_id=f"b{i}") for i, r in enumerate(ratios)]
        trs = [TextImageRequest(text=encoder.encode([q.prompt])[0], seed=q.seed, h_div_w=q.h_div_w,
                                resolution=q.resolution, request_id=q.request_id) for q in reqs]
        ref_out, eng_out = [], []
        t_ref = best_of(lambda out=ref_out, trs=trs: out.append(generate_infinity_reference(loaded, trs)),
                        args.repeats, warmup=1)
        t_eng = best_of(lambda out=eng_out, reqs=reqs: out.append(engine.generate(reqs)), args.repeats, warmup=1)
        ref_tokens = [torch.cat([pack_bits(t) for t in r.tokens]).tolist() for r in ref_out[-1]]
        same = all(e.tokens == t for e, t in zip(eng_out[-1], ref_tokens))
        s = engine.stats()
        assert s["used"] == 0 and s["requests_reserved"] == 0, s
        first = eng_out[-1][0]
        rows.append({
            "model": loaded.spec.name, "width": cfg.width, "depth": cfg.depth, "resolution": first.stats["resolution"],
            "load": load, "batch": args.batch, "tokens_per_image": len(first.tokens),
            "reference_s": round(t_ref, 3), "engine_s": round(t_eng, 3),
            "reference_img_s": round(args.batch / t_ref, 3), "engine_img_s": round(args.batch / t_eng, 3),
            "engine_over_reference": round(t_ref / t_eng, 3), "tokens_equal": same,
            "text_condition_bytes_per_request": first.stats["text_condition_bytes"],
            "kv_peak_bytes_per_request": first.kv_peak_bytes, "pages_reserved": first.stats["pages_reserved"],
        })
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"date": today(), "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
