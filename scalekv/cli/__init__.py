"""The ``scalekv`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from engine.precision import DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from engine.models.registry import DEFAULT_MODEL, MODELS

    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="named model config")
    p.add_argument("--checkpoint", default=None,
                   help="transformer weights (.safetensors or official .pth), or a directory holding "
                        "transformer.safetensors + tokenizer.safetensors; default: the shipped weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer weights (with a transformer --checkpoint file)")
    p.add_argument("--random-init", action="store_true",
                   help="allow random weights when no checkpoint is given (tests, benchmarks of shapes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def build_requests(classes: list[int], num: int, seed: int, cfg, top_k, top_p):
    """``num`` images per class label; image i of a class uses seed S + i."""
    from engine.requests import GenerationRequest

    return [
        GenerationRequest(class_label=c, seed=seed + i, cfg=cfg, top_k=top_k, top_p=top_p,
                          request_id=f"c{c}-s{seed + i}")
        for c in classes
        for i in range(num)
    ]


def write_results(results, out: Path, echo_json: bool) -> int:
    """PNG per image + ``results.jsonl``; returns the number of failed requests."""
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with (out / "results.jsonl").open("a") as f:
        for r in results:
            rec = r.summary()
            if r.ok:
                name = f"{r.request_id}.png"
                (out / name).write_bytes(r.png_bytes())
                rec["png"] = name
            else:
                failed += 1
            f.write(json.dumps(rec) + "\n")
            if echo_json:
                print(json.dumps(rec), flush=True)
    return failed


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.models.registry import build_model
    from engine.reference import generate_reference
    from engine.requests import validate_request

    _set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    spec = model.spec
    requests = build_requests(args.class_labels, args.num, args.seed, args.cfg, args.top_k, args.top_p)
    for r in requests:
        validate_request(r, spec.var.num_classes)
    requests = [r.resolved(spec.default_cfg, spec.default_top_k, spec.default_top_p) for r in requests]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    t0 = time.perf_counter()
    failed = 0
    bar = tqdm(total=len(requests), desc="generate", unit="img", disable=args.json or not sys.stderr.isatty())
    if args.reference:
        for i in range(0, len(requests), args.batch_size):
            chunk = requests[i : i + args.batch_size]
            failed += write_results(generate_reference(model, chunk, dtype=args.dtype), out, args.json)
            bar.update(len(chunk))
    else:
        from engine.api import EngineConfig, ImageEngine

        engine = ImageEngine(model, EngineConfig.from_args(args))
        for result in engine.generate_stream(requests):
            failed += write_results([result], out, args.json)
            bar.update(1)
    bar.close()
    dt = time.perf_counter() - t0
    if not args.json:
        print(f"{len(requests) - failed} image(s) in {dt:.2f}s ({len(requests) / dt:.2f} img/s) -> {out}/",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    if args.what == "tokenizer":
        from training.tokenizer import (
            TokenizerTrainConfig,
            evaluate_tokenizer,
            export_tokenizer,
            train_tokenizer,
        )

        d = TokenizerTrainConfig()
        cfg = TokenizerTrainConfig(model=args.model, steps=args.steps or d.steps,
                                   batch_size=args.batch_size or d.batch_size, lr=args.lr or d.lr,
                                   dtype=args.dtype, device=args.device)
        vae = train_tokenizer(cfg, args.run_dir)
        export_tokenizer(vae, str(Path(args.run_dir) / "tokenizer.safetensors"))
        print(json.dumps(evaluate_tokenizer(vae, 1000)))
    elif args.what == "transformer":
        from training.transformer import TransformerTrainConfig, export_transformer, train_transformer

        d = TransformerTrainConfig()
        cfg = TransformerTrainConfig(model=args.model, steps=args.steps or d.steps,
                                     batch_size=args.batch_size or d.batch_size, lr=args.lr or d.lr,
                                     dtype=args.dtype, device=args.device,
                                     tokenizer=args.tokenizer_weights or TransformerTrainConfig.tokenizer,
                                     num_images=args.num_images or d.num_images, warmup=args.warmup or d.warmup,
                                     init_from=args.init_from, coarse_scales=args.coarse_scales,
                                     full_every=args.full_every or d.full_every,
                                     perturb_rate=args.perturb_rate if args.perturb_rate is not None
                                     else d.perturb_rate, time_budget_s=args.time_budget,
                                     render_workers=args.render_workers or d.render_workers,
                                     save_every=args.save_every or d.save_every,
                                     log_every=args.log_every or d.log_every)
        var = train_transformer(cfg, args.run_dir)
        export_transformer(var, str(Path(args.run_dir) / "transformer.safetensors"))
    else:
        from training.classifier import train_classifier

        train_classifier(steps=args.steps or 2000, batch_size=args.batch_size or 64, lr=args.lr or 2e-3, seed=0,
                         out_path=str(Path(args.run_dir) / "classifier.safetensors"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Tokenizer PSNR, class accuracy of samples, attention report; JSON (+ heat-map PNG) in --out."""
    from engine.models.registry import build_model
    from training import evaluate

    if args.what == "prefix":
        try:
            forced = [int(k) for k in args.forced.split(",")]
        except ValueError:
            raise ValueError(f"--forced: expected comma-separated integers, got {args.forced!r}") from None
    _set_threads(args.threads)
    model = build_model(args.model, args.checkpoint, args.tokenizer, random_init=args.random_init)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = ["tokenizer", "samples", "attention", "grid"] if args.what == "all" else [args.what]
    summary = {}
    if "tokenizer" in what:
        from training.tokenizer import evaluate_tokenizer

        summary["tokenizer"] = evaluate_tokenizer(model.vae, args.num_images)
    if "samples" in what:
        from engine.api import EngineConfig

        summary["samples"] = evaluate.sample_accuracy(model, args.per_class, args.seed, EngineConfig(dtype=args.dtype),
                                                      cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    if "attention" in what:
        from engine.requests import GenerationRequest

        spec = model.spec
        reqs = [GenerationRequest(class_label=i % spec.var.num_classes, seed=args.seed + i, cfg=spec.default_cfg,
                                  top_k=spec.default_top_k, top_p=spec.default_top_p)
                for i in range(args.attention_requests)]
        rep = evaluate.attention_report(model, reqs)
        evaluate.save_json(rep, out / "attention_report.json")
        evaluate.plot_attention_report(rep, out / "attention_report.png")
        summary["attention"] = rep["summary"]
    if "grid" in what:
        from engine.api import EngineConfig

        evaluate.sample_grid(model, out / "samples_grid.png", per_class=8, seed=args.seed,
                             engine_config=EngineConfig(dtype=args.dtype))
        summary["grid"] = str(out / "samples_grid.png")
    if "prefix" in what:
        summary["prefix"] = evaluate.forced_prefix_accuracy(model, forced, args.per_class, dtype=args.dtype)
    evaluate.save_json(summary, out / "eval.json")
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalekv", description="Serve next-scale VAR image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images locally (in-process engine)")
    _add_model_args(g)
    g.add_argument("--class", dest="class_labels", type=int, action="append", default=None,
                   help="class label (repeatable); default: class 0")
    g.add_argument("--num", type=int, default=1, help="images per class label (image i uses seed S+i)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 disables (default: the model's)")
    g.add_argument("--top-p", type=float, default=None, help="top-p filter, 0 disables (default: the model's)")
    g.add_argument("--out", default="out", help="output directory for PNGs and results.jsonl")
    g.add_argument("--json", action="store_true", help="print one JSON record per image on stdout")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="compute dtype (auto: bf16 on CUDA and CPUs with native bf16, float32 elsewhere)")
    g.add_argument("--reference", action="store_true", help="use the naive reference loop instead of the engine")
    g.add_argument("--batch-size", type=int, default=16, help="requests per batch of the reference loop")
    _add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="evaluate a model: tokenizer PSNR, sample class accuracy, attention report")
    e.add_argument("what", choices=["tokenizer", "samples", "attention", "grid", "prefix", "all"],
                   help="prefix: teacher-force the first k scales of real images, sample the rest, classify "
                        "(where samples lose their class; not part of all)")
    _add_model_args(e)
    e.add_argument("--out", default="out/eval", help="folder for eval.json and the attention report")
    e.add_argument("--num-images", type=int, default=1000, help="held-out images for tokenizer PSNR")
    e.add_argument("--per-class", type=int, default=100, help="generated images per class for accuracy")
    e.add_argument("--attention-requests", type=int, default=16, help="requests for the attention report")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--cfg", type=float, default=None, help="(samples) guidance scale (default: the model's)")
    e.add_argument("--top-k", type=int, default=None, help="(samples) top-k, 0 disables (default: the model's)")
    e.add_argument("--top-p", type=float, default=None, help="(samples) top-p, 0 disables (default: the model's)")
    e.add_argument("--dtype", default="auto", choices=list(DTYPES), help="compute dtype (default auto)")
    e.add_argument("--forced", default="0,6,8,10", help="(prefix) comma-separated numbers of forced scales")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train the tokenizer, the transformer or the eval classifier")
    t.add_argument("what", choices=["tokenizer", "transformer", "classifier"])
    t.add_argument("--model", default="var-tiny")
    t.add_argument("--run-dir", required=True, help="folder for resumable checkpoints and logs")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="compute dtype (auto: bf16 autocast on CUDA and CPUs with native bf16, float32 elsewhere)")
    t.add_argument("--device", default="cuda" if _cuda() else "cpu")
    t.add_argument("--tokenizer-weights", default=None, help="(transformer) the trained tokenizer")
    t.add_argument("--threads", type=int, default=None)
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
    t.set_defaults(func=cmd_train)
    __import__("scalekv.cli.kv", fromlist=["register"]).register(sub)  # scalekv calibrate, scalekv bench fidelity
    __import__("scalekv.cli.bench", fromlist=["register"]).register(sub)  # scalekv bench load
    __import__("scalekv.cli.cluster", fromlist=["register"]).register(sub)  # scalekv cluster, submit, status
    return parser


def bench_subcommands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``scalekv bench``, created on first use: several modules add their
    benchmark (``fidelity``, ``load``) to the same ``bench`` parser."""
    bench = sub.choices.get("bench") or sub.add_parser("bench", help="benchmarks")
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_command", required=True)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine knobs; kept in one place so generate, cluster and bench agree."""
    from engine.api import EngineConfig

    EngineConfig.add_cli_args(p)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "class_labels", "unset") is None:
        args.class_labels = [0]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"scalekv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
