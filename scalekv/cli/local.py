"""``scalekv generate`` (the in-process engine) and ``scalekv models`` (what can be served)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import args as shared


def register(sub: argparse._SubParsersAction) -> None:
    g = shared.add_parser(sub, "generate", "generate images locally (in-process engine)")
    shared.add_model_args(g, infinity=True)
    g.add_argument("--class", dest="class_labels", type=shared.class_label, action="append", default=None,
                   metavar="CLASS", help="class index or name, e.g. 3 or ring-striped (repeatable; default: 0)")
    t = g.add_argument_group("text-to-image models (Infinity; the prompt encoder is --text-encoder DIR)")
    t.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help="prompt of an image (repeatable; required for Infinity models)")
    t.add_argument("--negative-prompt", default=None, help="replaces the learned unconditional text")
    t.add_argument("--h-div-w", type=float, default=None, help="aspect ratio height / width (default 1.0; "
                                                               "snapped to the model's nearest template)")
    t.add_argument("--aspect-ratio", default=None, help="aspect ratio as WIDTH:HEIGHT, e.g. 16:9")
    t.add_argument("--resolution", default=None, help="named resolution, e.g. 0.06M, 0.25M, 1M (default: "
                                                      "the model's)")
    t.add_argument("--tau", type=float, default=None, help="logit temperature (default: the model's)")
    g.add_argument("--list-classes", action="store_true", help="print the model's classes and exit")
    g.add_argument("--num", type=int, default=1, help="images per class (image i uses seed S+i)")
    g.add_argument("--seed", type=int, default=0, help="seed S of the first image of each class")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 disables (default: the model's)")
    g.add_argument("--top-p", type=float, default=None, help="top-p filter, 0 disables (default: the model's)")
    g.add_argument("--out", default="out", help="output directory for PNGs and results.jsonl")
    shared.add_json(g, "one result record per image")
    g.add_argument("--reference", action="store_true", help="use the naive reference loop instead of the engine")
    g.add_argument("--batch-size", type=int, default=16, help="requests per batch of the reference loop")
    shared.add_threads(g)
    shared.add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    m = shared.add_parser(sub, "models", "list the named models, their shipped weights and classes")
    shared.add_json(m, "the model table")
    m.set_defaults(func=cmd_models)


def write_results(results, out: Path, echo_json: bool) -> int:
    """One PNG per image + one ``results.jsonl`` record per result (``ImageResult.to_record``,
    the schema ``scalekv submit`` writes too); returns the number of failed requests."""
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with (out / "results.jsonl").open("a") as f:
        for r in results:
            name = None
            if r.ok:
                name = f"{r.request_id}.png"
                (out / name).write_bytes(r.png_bytes())
            else:
                failed += 1
            rec = r.to_record(png=name)
            f.write(json.dumps(rec) + "\n")
            if echo_json:
                print(json.dumps(rec), flush=True)
    return failed


def cmd_generate(args: argparse.Namespace) -> int:

    from engine.api import EngineConfig, ImageEngine
    from engine.models.catalog import INFINITY_MODELS, get_spec
    from engine.models.registry import build_model
    from engine.reference import generate_reference
    from engine.request import ImageRequest, resolve_class

    if args.model in INFINITY_MODELS:
        return _generate_infinity(args)
    infinity_flags = [f for f, v in (("--prompt", args.prompts), ("--negative-prompt", args.negative_prompt),
                                     ("--h-div-w", args.h_div_w), ("--aspect-ratio", args.aspect_ratio),
                                     ("--resolution", args.resolution), ("--tau", args.tau)) if v is not None]
    if infinity_flags:
        raise ValueError(f"{infinity_flags[0]}: model {args.model!r} is class-conditional (use --class); "
                         f"text-to-image models: {', '.join(sorted(INFINITY_MODELS))}")
    spec = get_spec(args.model)
    if args.list_classes:
        return _print_classes(spec, args.json)
    try:
        labels = [resolve_class(c, spec.class_names, spec.var.num_classes) for c in args.class_labels or [0]]
    except ValueError as e:
        raise ValueError(f"--class: {e}") from None
    requests = [ImageRequest(class_label=c, seed=args.seed + i, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             request_id=f"c{c}-s{args.seed + i}")
                for c in labels for i in range(args.num)]
    config = EngineConfig.from_args(args)  # bad knobs fail here, before the model loads
    shared.set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    if args.reference:
        resolved = [r.resolved(spec.default_cfg, spec.default_top_k, spec.default_top_p) for r in requests]
        chunks = (resolved[i : i + args.batch_size] for i in range(0, len(resolved), args.batch_size))
        results = (r for chunk in chunks for r in generate_reference(model, chunk, dtype=config.dtype))
    else:
        results = ImageEngine(model, config).generate_stream(requests)
    return _write_all(results, len(requests), Path(args.out), args.json)


def _write_all(results, total: int, out: Path, as_json: bool) -> int:
    """Write results as they come (PNGs + ``results.jsonl``) under a per-image progress bar;
    exit code 1 if any request failed."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    t0 = time.perf_counter()
    failed = 0
    bar = tqdm(total=total, desc="generate", unit="img", disable=as_json)
    for result in results:
        failed += write_results([result], out, as_json)
        bar.update(1)
    bar.close()
    dt = time.perf_counter() - t0
    if not as_json:
        print(f"{total - failed} image(s) in {dt:.2f}s ({total / dt:.2f} img/s) -> {out}/", file=sys.stderr)
    return 1 if failed else 0


def _generate_infinity(args: argparse.Namespace) -> int:
    """``generate`` for a text-to-image model: one request per prompt and seed, through the
    Infinity engine (``make_engine``)."""
    from pydantic import ValidationError

    from engine.api import EngineConfig, make_engine
    from engine.models.registry import build_model
    from engine.request import ImageRequest, field_errors

    if args.class_labels:
        raise ValueError(f"--class: model {args.model!r} is text-to-image: give --prompt TEXT")
    if args.list_classes:
        raise ValueError(f"--list-classes: model {args.model!r} is text-to-image and has no classes")
    if args.reference:
        raise ValueError("--reference: the Infinity reference loop takes encoded texts; use the Python API "
                         "(engine.infinity_reference.generate_infinity_reference)")
    if not args.prompts:
        raise ValueError(f"--prompt: model {args.model!r} is text-to-image: give at least one --prompt TEXT")
    try:
        requests = [ImageRequest(prompt=p, negative_prompt=args.negative_prompt, h_div_w=args.h_div_w,
                                 aspect_ratio=args.aspect_ratio, resolution=args.resolution, seed=args.seed + i,
                                 cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
                                 request_id=f"p{j}-s{args.seed + i}")
                    for j, p in enumerate(args.prompts) for i in range(args.num)]
    except ValidationError as e:
        f = field_errors(e)[0]
        raise ValueError(f"--{f.field.replace('_', '-')}: {f.reason}") from None
    config = EngineConfig.from_args(args)
    if not config.text_encoder:
        raise ValueError(f"--text-encoder: model {args.model!r} encodes prompts with a local text encoder "
                         "directory (a saved T5EncoderModel + tokenizer); nothing is downloaded")
    shared.set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    return _write_all(make_engine(model, config).generate_stream(requests), len(requests), Path(args.out), args.json)


def _print_classes(spec, as_json: bool) -> int:
    names = spec.class_names or [str(i) for i in range(spec.var.num_classes)]
    if as_json:
        print(json.dumps({"model": spec.name, "classes": list(names)}))
    else:
        for i, n in enumerate(names):
            print(f"{i:>4}  {n}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models.catalog import INFINITY_MODELS, MODELS
    from engine.models.registry import default_checkpoint_dir

    rows = []
    for name, spec in MODELS.items():
        v = spec.var
        rows.append({"model": name, "depth": v.depth, "width": v.width, "heads": v.num_heads,
                     "image_size": spec.vae.image_size, "tokens": v.seq_len, "scales": v.num_scales,
                     "classes": v.num_classes, "class_names": list(spec.class_names or []),
                     "shipped_weights": default_checkpoint_dir(spec) is not None, "notes": spec.notes})
    t2i = []
    for name, spec in INFINITY_MODELS.items():
        m = spec.model
        res = {r: list(spec.image_size(1.0, r)) for r, _ in m.resolutions}
        t2i.append({"model": name, "kind": "infinity", "depth": m.depth, "width": m.width, "heads": m.num_heads,
                    "token_bits": m.token_bits, "resolutions": res, "default_resolution": m.default_resolution,
                    "aspect_ratios": [r for r, _ in m.ratio_table()],
                    "tokens": sum(m.scale_lengths(1.0, m.default_resolution)), "text_channels": m.text_channels,
                    "weights": list(spec.checkpoint_files), "notes": spec.notes})
    if args.json:
        print(json.dumps([{"kind": "var", **r} for r in rows] + t2i, indent=1))
        return 0
    print(f"{'model':<10} {'depth':>5} {'width':>5} {'px':>4} {'tokens':>6} {'classes':>7} {'weights':<8} notes")
    for r in rows:
        print(f"{r['model']:<10} {r['depth']:>5} {r['width']:>5} {r['image_size']:>4} {r['tokens']:>6} "
              f"{r['classes']:>7} {'shipped' if r['shipped_weights'] else '-':<8} {r['notes']}")
        if r["class_names"]:
            print(f"{'':<10} classes: {', '.join(f'{i} {n}' for i, n in enumerate(r['class_names']))}")
    print()
    print("text-to-image (Infinity; --prompt, --text-encoder DIR; weights: pass the released files)")
    print(f"{'model':<15} {'depth':>5} {'width':>5} {'bits':>4} {'tokens':>6}  resolutions (px at 1:1)")
    for r in t2i:
        res = ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in r["resolutions"].items())
        print(f"{r['model']:<15} {r['depth']:>5} {r['width']:>5} {r['token_bits']:>4} {r['tokens']:>6}  {res}")
        print(f"{'':<15} {r['notes']}")
    return 0
