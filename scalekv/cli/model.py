"""``scalekv train``, ``scalekv eval`` and ``scalekv calibrate``: making and measuring models.

Training, evaluation and the shape classifier live in ``training/`` (off the serving path);
calibration (it runs the model to find drafter layers) in ``engine/calibrate.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import args as shared


def register(sub: argparse._SubParsersAction) -> None:
    e = shared.add_parser(sub, "eval", "evaluate a model: tokenizer PSNR, sample class accuracy, attention report")
    e.add_argument("what", choices=["tokenizer", "samples", "attention", "grid", "prefix", "all"],
                   help="prefix: teacher-force the first k scales of real images, sample the rest, classify "
                        "(where samples lose their class; not part of all)")
    shared.add_model_args(e)
    e.add_argument("--out", default="out/eval", help="folder for eval.json and the attention report")
    e.add_argument("--num-images", type=int, default=1000, help="held-out images for tokenizer PSNR")
    e.add_argument("--per-class", type=int, default=100, help="generated images per class for accuracy")
    e.add_argument("--attention-requests", type=int, default=16, help="requests for the attention report")
    e.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    e.add_argument("--cfg", type=float, default=None, help="(samples) guidance scale (default: the model's)")
    e.add_argument("--top-k", type=int, default=None, help="(samples) top-k, 0 disables (default: the model's)")
    e.add_argument("--top-p", type=float, default=None, help="(samples) top-p, 0 disables (default: the model's)")
    e.add_argument("--forced", default="0,6,8,10", help="(prefix) comma-separated numbers of forced scales")
    shared.add_dtype(e)
    shared.add_threads(e)
    shared.add_json(e, "the summary")
    e.set_defaults(func=cmd_eval)

    t = shared.add_parser(sub, "train", "train the tokenizer, the transformer or the eval classifier "
                                        "(resumable: re-run the same command)")
    t.add_argument("what", choices=["tokenizer", "transformer", "classifier"])
    t.add_argument("--model", default="var-tiny", help="named model config to train")
    t.add_argument("--run-dir", required=True, help="folder for resumable checkpoints and logs")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: the recipe's)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    shared.add_dtype(t)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda where one is visible)")
    t.add_argument("--tokenizer-weights", default=None, help="(transformer) the trained tokenizer "
                                                             "(default: var-tiny's shipped one)")
    shared.add_threads(t)
    t.add_argument("--num-images", type=int, default=None, help="(transformer) size of the pre-tokenised set")
    t.add_argument("--warmup", type=int, default=None, help="(transformer) warm-up steps of the lr schedule")
    t.add_argument("--init-from", default=None,
                   help="(transformer) start a new run from these weights, e.g. the shipped transformer.safetensors")
    t.add_argument("--coarse-scales", type=int, default=None,
                   help="(transformer) train most steps on the first K scales only (exact, ~3x cheaper for K=8)")
    t.add_argument("--full-every", type=int, default=None,
                   help="(transformer) with --coarse-scales: every N-th step trains on all scales (default 1)")
    t.add_argument("--perturb-rate", type=float, default=None,
                   help="(transformer) self-correction: replace up to this fraction of each fed scale's tokens by "
                        "nearby codes and re-quantise later targets (default 0: plain teacher forcing)")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="(transformer) size the run to this many seconds of training instead of --steps: "
                        "the warm-up's throughput sets the step count (e.g. for a lent GPU)")
    t.add_argument("--render-workers", type=int, default=None,
                   help="(transformer) processes rendering the training set while --device encodes it (default 1)")
    t.add_argument("--save-every", type=int, default=None,
                   help="(transformer) steps between resumable checkpoints (default 20; raise it on a GPU)")
    t.add_argument("--log-every", type=int, default=None, help="(transformer) steps between log records (default 10)")
    t.add_argument("--export-only", action="store_true",
                   help="(transformer) write the run's latest checkpoint to RUN_DIR/transformer.safetensors and "
                        "exit without training (evaluate or carry a run mid-way)")
    t.add_argument("--distill-from", default=None,
                   help="(transformer) also learn a trained teacher's per-token distributions, e.g. "
                        "engine/models/weights/var-tiny/transformer.safetensors (default: off)")
    t.add_argument("--distill-model", default=None,
                   help="(transformer) the teacher's named config; it must share the tokenizer, schedule and "
                        "classes (default: var-tiny)")
    t.add_argument("--distill-weight", type=float, default=None,
                   help="(transformer) loss = (1 - w) * cross-entropy + w * KL(teacher || model) (default 0.5)")
    t.set_defaults(func=cmd_train)

    c = shared.add_parser(sub, "calibrate", "measure drafter/refiner layers and write a scale profile (ScaleKV)")
    shared.add_model_args(c, infinity=True)
    i = c.add_argument_group("text-to-image models (Infinity): one profile per schedule (aspect ratio x resolution)")
    i.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help="a calibration prompt (repeatable; required for Infinity models)")
    i.add_argument("--text-encoder", default=None, help="local directory of the prompt encoder (nothing downloads)")
    i.add_argument("--aspect-ratio", default=None, help="aspect ratio as WIDTH:HEIGHT, e.g. 16:9 (default 1:1)")
    i.add_argument("--resolution", default=None, help="named resolution, e.g. 0.06M (default: the model's)")
    c.add_argument("--num-requests", type=int, default=10, help="calibration requests")
    c.add_argument("--num-drafters", type=int, default=None,
                   help="(layer, scale) pairs marked as drafters over all scales (default: scales - 1)")
    c.add_argument("--num-queries", type=int, default=64, help="sampled queries per (scale, layer)")
    c.add_argument("--topk-ratio", type=float, default=0.1,
                   help="K' of the history top-K' ratio, as a fraction of the history")
    c.add_argument("--seed", type=int, default=0, help="seed of the first calibration request")
    c.add_argument("--out", required=True,
                   help="profile JSON to write (e.g. engine/models/weights/M/scale_profile.json)")
    shared.add_threads(c)
    shared.add_json(c, "the summary")
    c.set_defaults(func=cmd_calibrate)


def cmd_train(args: argparse.Namespace) -> int:
    shared.set_threads(args.threads)
    device = args.device or ("cuda" if _cuda() else "cpu")
    if args.what == "tokenizer":
        from training.tokenizer import TokenizerTrainConfig, evaluate_tokenizer, export_tokenizer, train_tokenizer

        d = TokenizerTrainConfig()
        config = TokenizerTrainConfig(model=args.model, steps=args.steps or d.steps,
                                   batch_size=args.batch_size or d.batch_size, lr=args.lr or d.lr,
                                   dtype=args.dtype, device=device)
        vae = train_tokenizer(config, args.run_dir)
        export_tokenizer(vae, str(Path(args.run_dir) / "tokenizer.safetensors"))
        print(json.dumps(evaluate_tokenizer(vae, 1000)))
    elif args.what == "transformer" and args.export_only:
        from training.transformer import export_checkpoint

        out = str(Path(args.run_dir) / "transformer.safetensors")
        step = export_checkpoint(args.model, args.run_dir, out)
        print(json.dumps({"exported": out, "step": step}))
    elif args.what == "transformer":
        from training.transformer import TransformerTrainConfig, export_transformer, train_transformer

        d = TransformerTrainConfig()
        given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "tokenizer": args.tokenizer_weights,
                 "num_images": args.num_images, "warmup": args.warmup, "init_from": args.init_from,
                 "coarse_scales": args.coarse_scales, "full_every": args.full_every,
                 "perturb_rate": args.perturb_rate, "time_budget_s": args.time_budget,
                 "render_workers": args.render_workers, "save_every": args.save_every, "log_every": args.log_every,
                 "distill_from": args.distill_from, "distill_model": args.distill_model,
                 "distill_weight": args.distill_weight}
        config = TransformerTrainConfig(model=args.model, dtype=args.dtype, device=device,
                                     **{k: (getattr(d, k) if v is None else v) for k, v in given.items()})
        var = train_transformer(config, args.run_dir)
        export_transformer(var, str(Path(args.run_dir) / "transformer.safetensors"))
    else:
        from training.classifier import train_classifier

        train_classifier(steps=args.steps or 2000, batch_size=args.batch_size or 64, lr=args.lr or 2e-3, seed=0,
                         out_path=str(Path(args.run_dir) / "classifier.safetensors"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Tokenizer PSNR, class accuracy of samples, attention report; JSON (+ heat-map PNG) in --out."""
    from engine.calibrate import attention_report, plot_attention_report
    from engine.config import EngineConfig
    from engine.models.registry import build_model
    from engine.request import ImageRequest
    from training import evaluate

    if args.what == "prefix":
        try:
            forced = [int(k) for k in args.forced.split(",")]
        except ValueError:
            raise ValueError(f"--forced: expected comma-separated integers, got {args.forced!r}") from None
    shared.set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = ["tokenizer", "samples", "attention", "grid"] if args.what == "all" else [args.what]
    summary = {}
    if "tokenizer" in what:
        from training.tokenizer import evaluate_tokenizer

        summary["tokenizer"] = evaluate_tokenizer(model.vae, args.num_images)
    if "samples" in what:
        summary["samples"] = evaluate.sample_accuracy(model, args.per_class, args.seed, EngineConfig(dtype=args.dtype),
                                                      cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    if "attention" in what:
        spec = model.spec
        reqs = [ImageRequest(class_label=i % spec.var.num_classes, seed=args.seed + i, cfg=spec.default_cfg,
                             top_k=spec.default_top_k, top_p=spec.default_top_p)
                for i in range(args.attention_requests)]
        rep = attention_report(model, reqs)
        evaluate.save_json(rep, out / "attention_report.json")
        plot_attention_report(rep, out / "attention_report.png")
        summary["attention"] = rep["summary"]
    if "grid" in what:
        evaluate.sample_grid(model, out / "samples_grid.png", per_class=8, seed=args.seed,
                             engine_config=EngineConfig(dtype=args.dtype))
        summary["grid"] = str(out / "samples_grid.png")
    if "prefix" in what:
        summary["prefix"] = evaluate.forced_prefix_accuracy(model, forced, args.per_class, dtype=args.dtype)
    evaluate.save_json(summary, out / "eval.json")
    print(json.dumps(summary, indent=None if args.json else 1))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from engine.calibrate import timed_calibrate
    from engine.models.registry import build_model

    shared.set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    if hasattr(model, "tokenizer"):  # Infinity: prompts and one schedule
        import time

        from engine.calibrate import calibrate_infinity
        from engine.request import parse_aspect_ratio
        from engine.text import TextEncoder

        if not args.prompts:
            raise ValueError(f"--prompt: model {args.model!r} is text-to-image: give at least one --prompt TEXT")
        if not args.text_encoder:
            raise ValueError("--text-encoder: Infinity models need the local prompt encoder directory")
        texts = TextEncoder(args.text_encoder).encode(args.prompts)
        t0 = time.perf_counter()
        prof = calibrate_infinity(model, texts, parse_aspect_ratio(args.aspect_ratio) if args.aspect_ratio else 1.0,
                                  args.resolution, seed=args.seed, num_queries=args.num_queries,
                                  topk_ratio=args.topk_ratio, num_drafters=args.num_drafters)
        seconds = time.perf_counter() - t0
    else:
        prof, seconds = timed_calibrate(model, num_requests=args.num_requests, seed=args.seed,
                                        num_queries=args.num_queries, topk_ratio=args.topk_ratio,
                                        num_drafters=args.num_drafters)
    prof.save(args.out)
    drafters = {str(si): list(d) for si, d in enumerate(prof.drafters) if d}
    summary = {"model": prof.model, "out": args.out, "seconds": round(seconds, 2), "drafters_per_scale": drafters}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out} in {seconds:.1f}s; drafters per scale: "
              + ", ".join(f"{k}:{v}" for k, v in drafters.items()))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
