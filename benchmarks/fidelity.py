"""Fidelity of KV policies against the full cache: same requests, same seeds, every policy.

For each (policy, kv_budget) the harness generates the same requests through an
``ImageEngine`` and compares with the ``full`` run: PSNR and SSIM of the images, token agreement
per scale, FID between the full-cache images and the policy's, class accuracy of the samples (the
shape classifier, for ``var-tiny``), the peak KV bytes of a request measured from the pool (pages it
held at its peak, plus the per-step scratch of the current scale's K/V, as in the engine's results)
and their ratio to ``full``, and how many requests a fixed pool admits at once under the policy's
reservation.

Metrics are consistency metrics (policy vs the full cache), like the paper's Table 1: a
lossless policy scores PSNR = ``PSNR_CAP`` and SSIM = 1.

Telling policies apart: every policy runs the same seeds, so each (policy, budget) is also compared
seed by seed with a reference policy (``FidelityConfig.reference``, default ``scalekv``) at the same
budget: ``delta_psnr`` / ``delta_ssim`` are the mean per-seed differences (policy - reference) with a
Student t interval (:mod:`benchmarks.stats`). An interval that excludes 0 is a difference the seeds
resolve. The per-seed values are in the JSON (``psnr_per_seed``, ``ssim_per_seed``, in request
order) for other analyses. Note that a seed whose image equals the full cache's scores ``PSNR_CAP``,
which dominates a PSNR mean or difference; ``identical_images`` counts them.

Conventions (also printed above the table):

* PSNR: per image, uint8 RGB, peak 255, then averaged over seeds.
* SSIM: torchmetrics' ``structural_similarity_index_measure`` defaults on [0, 1] float RGB
  (``data_range=1``): Gaussian window 11 px, sigma 1.5, K1 = 0.01, K2 = 0.03, borders reflect-padded,
  the SSIM map averaged over channels and pixels per image, then over seeds.
* FID: torchmetrics' ``FrechetInceptionDistance`` with the shape classifier's penultimate features
  (:mod:`benchmarks.fid`), not Inception, between the full-cache images and the policy's (same
  seeds); only for models the classifier can judge (``CLASSIFIER_MODELS``). With fewer images than
  features (160) the covariances are rank deficient and FID is biased upwards. ``delta_fid``: a row's
  FID minus the reference policy's, with the percentile interval of a paired bootstrap over seeds
  (``fid_bootstrap`` resamples; FID is one number per set, so it has no t-interval).

Memory fields: ``kv_peak_bytes`` / ``kv_ratio`` (pool pages at the request's peak plus the
scratch, as the engine reports them), ``kv_pool_*`` (pool pages only), ``quota_pages`` (the
largest sum of per-layer quotas at a scale) and ``request_pages`` (the reservation: also counts
the transient while a layer grows before a later layer shrinks, e.g. when the drafter role
moves to an earlier layer), ``capacity`` (requests the fixed pool admits at once) and
``capacity_ratio`` (full's reservation / this policy's).

    scalekv bench fidelity --model var-tiny --policies full,scalekv,snapkv --budgets 0.04,0.1,0.2 \\
        --num 200 --report out/fidelity.json --plot out/fidelity
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.fidelity_plots import plot_grid, plot_sweep
from benchmarks.image_metrics import (  # noqa: F401  (re-exported: the harness's metrics)
    PSNR_CAP,
    class_accuracy,
    class_correct,
    psnr,
    ssim,
    ssim_batch,
    token_agreement,
)
from benchmarks.stats import Interval, mean_ci, paired_delta
from engine.api import EngineConfig, ImageEngine
from engine.models.catalog import MODELS, SHAPES_CLASS_NAMES
from engine.models.registry import LoadedModel
from engine.request import ImageRequest, ImageResult

# Models whose images the shape classifier can judge: those trained here on the shapes dataset (var-tiny,
# var-deep), found by their class list so a new shapes model needs no edit here.
CLASSIFIER_MODELS = tuple(name for name, spec in MODELS.items() if spec.class_names == SHAPES_CLASS_NAMES)
SSIM_CONVENTION = ("torchmetrics structural_similarity_index_measure defaults on [0,1] RGB: Gaussian window 11, "
                   "sigma 1.5, K1 0.01, K2 0.03, reflect-padded borders, mean over channels and pixels")
FID_CONVENTION = ("torchmetrics FrechetInceptionDistance on the shape classifier's penultimate features "
                  "(global-average-pooled last conv stage), NOT Inception; full-cache images vs the policy's")

__all__ = ["FidelityConfig", "format_table", "psnr", "run_fidelity", "ssim", "ssim_batch", "token_agreement",
           "write_outputs"]


@dataclass
class FidelityConfig:
    """What to compare. Engine knobs are shared by every run so only the policy differs."""

    policies: list[str] = field(default_factory=lambda: ["full", "scalekv", "snapkv", "pyramidkv", "sliding",
                                                         "streaming", "h2o"])
    budgets: list[float] = field(default_factory=lambda: [0.04, 0.1, 0.2])  # the ScaleKV paper's Table 1
    num: int = 200  # requests (= seeds) per policy, the same seeds for every policy
    seed: int = 0
    # every engine knob (block size, pool, profile, scoring, drafters, peak_limit...) of every run;
    # policy and kv_budget are set per run. The pool is fixed for the concurrency figure.
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(dtype="float32", kv_pool_bytes=128 << 20))
    reference: str | None = "scalekv"  # paired deltas of every policy vs this one, same budget, same seeds
    confidence: float = 0.95  # of the paired t-intervals
    fid: bool = True  # FID on the classifier's features (only for CLASSIFIER_MODELS)
    fid_bootstrap: int = 1000  # resamples of the paired FID-difference interval vs the reference (0: none)

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num: must be >= 1, got {self.num}")
        if not self.policies:
            raise ValueError("policies: give at least one policy")
        if self.reference == "full":
            raise ValueError("reference: 'full' is what every metric is measured against; pick a compressing "
                             "policy (or None for no paired deltas)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence: a fraction in (0, 1), got {self.confidence}")
        if self.fid_bootstrap < 0:
            raise ValueError(f"fid_bootstrap: resamples must be >= 0 (0: no FID interval), got {self.fid_bootstrap}")
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets: each must be a fraction in (0, 1], got {b}")

    def engine_config(self, policy: str, kv_budget: float) -> EngineConfig:
        return replace(self.engine, policy=policy, kv_budget=kv_budget)


# --------------------------------------------------------------------------- runs
def make_requests(model: LoadedModel, num: int, seed: int) -> list[ImageRequest]:
    """Request i: class i mod num_classes, seed seed + i, the model's default sampling."""
    spec = model.spec
    return [ImageRequest(class_label=i % spec.var.num_classes, seed=seed + i, request_id=f"r{i}")
            for i in range(num)]


@dataclass
class PolicyRun:
    policy: str
    kv_budget: float
    results: list[ImageResult]
    seconds: float
    request_pages: int  # pages reserved per request (both CFG sequences), transients included
    quota_pages: int  # the largest sum of per-layer quotas over scales, both sequences
    pool_pages: int
    page_bytes: int

    @property
    def capacity(self) -> int:
        """Requests the fixed pool admits at once under this policy's reservation."""
        return self.pool_pages // self.request_pages

    def kv_peak_bytes(self) -> float:
        return float(np.mean([r.kv_peak_bytes for r in self.results]))

    def pool_peak_bytes(self) -> float:
        return float(np.mean([r.stats["pages_peak"] for r in self.results])) * self.page_bytes


def run_policy(model: LoadedModel, requests: list[ImageRequest], policy: str, kv_budget: float,
               cfg: FidelityConfig) -> PolicyRun:
    engine = ImageEngine(model, cfg.engine_config(policy, kv_budget))
    plan = engine.plan_for(policy, kv_budget)
    t0 = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"policy {policy!r} at kv_budget {kv_budget}: request {bad[0].request_id} failed: "
                           f"{bad[0].error}")
    if engine.pool.num_free != engine.pool.num_pages:
        raise RuntimeError(f"policy {policy!r}: {engine.pool.num_used} pages not returned to the pool")
    bs = engine.pool.block_size
    quota = 2 * max(sum(-(-k // bs) for k in row) for row in plan.kept)
    return PolicyRun(policy, kv_budget, results, seconds, engine.manager.request_pages(plan), quota,
                     engine.pool.num_pages, engine.pool.page_bytes)


def compare(run: PolicyRun, full: PolicyRun, lengths: list[int], with_classes: bool, *,
            fid_fn=None, classifier: torch.nn.Module | None = None, confidence: float = 0.95) -> dict:
    """The metrics of one run against the full-cache run (request i of one vs request i of the other).

    ``fid_fn`` maps the run's images to their FID against the full-cache images (None: no FID)."""
    if [r.request_id for r in run.results] != [f.request_id for f in full.results]:
        raise ValueError("compare: the runs must hold the same requests in the same order")
    pairs = list(zip(run.results, full.results))
    agree = np.mean([token_agreement(r.tokens, f.tokens, lengths) for r, f in pairs], axis=0)
    psnrs = np.array([psnr(r.image, f.image) for r, f in pairs])
    ssims = ssim_batch([r.image for r in run.results], [f.image for f in full.results])
    rec = {
        "policy": run.policy,
        "kv_budget": run.kv_budget,
        "psnr": float(psnrs.mean()),
        "psnr_ci": mean_ci(psnrs, confidence).to_dict(),
        "ssim": float(ssims.mean()),
        "ssim_ci": mean_ci(ssims, confidence).to_dict(),
        "identical_images": int(sum(np.array_equal(r.image, f.image) for r, f in pairs)),
        "token_agreement": [round(float(a), 6) for a in agree],
        "token_agreement_all": float(np.mean([np.mean(np.asarray(r.tokens) == np.asarray(f.tokens))
                                              for r, f in pairs])),
        "kv_peak_bytes": run.kv_peak_bytes(),
        "kv_ratio": run.kv_peak_bytes() / full.kv_peak_bytes(),
        "kv_pool_peak_bytes": run.pool_peak_bytes(),
        "kv_pool_ratio": run.pool_peak_bytes() / full.pool_peak_bytes(),
        "request_pages": run.request_pages,
        "quota_pages": run.quota_pages,
        "capacity": run.capacity,
        "capacity_ratio": full.request_pages / run.request_pages,
        "seconds": round(run.seconds, 3),
        "images_per_second": round(len(run.results) / run.seconds, 3),
        "fid": None if fid_fn is None else fid_fn([r.image for r in run.results]),
        "psnr_per_seed": [float(x) for x in psnrs],
        "ssim_per_seed": [float(x) for x in ssims],
    }
    if with_classes:
        correct = class_correct(run.results, classifier)
        rec["class_accuracy"] = float(correct.mean())
        rec["class_correct_per_seed"] = [int(c) for c in correct]
    return rec


def _delta(rec: dict, ref: dict, key: str, confidence: float) -> dict:
    iv: Interval = paired_delta(rec[key], ref[key], confidence)
    return iv.to_dict()  # the per-seed lists are in request order, the same seeds in every row


def add_paired_deltas(rows: list[dict], reference: str, confidence: float = 0.95) -> int:
    """Give every row ``delta_psnr`` / ``delta_ssim`` (and ``delta_class_accuracy`` when classes are
    judged): per-seed differences row - reference row at the same budget, mean and t-interval.
    Rows without a reference run at their budget get None. Returns how many rows got deltas."""
    refs = {r["kv_budget"]: r for r in rows if r["policy"] == reference}
    done = 0
    for r in rows:
        ref = refs.get(r["kv_budget"])
        if ref is None:
            r["delta_psnr"] = r["delta_ssim"] = None
            continue
        r["delta_psnr"] = _delta(r, ref, "psnr_per_seed", confidence)
        r["delta_ssim"] = _delta(r, ref, "ssim_per_seed", confidence)
        if "class_correct_per_seed" in r:
            r["delta_class_accuracy"] = _delta(r, ref, "class_correct_per_seed", confidence)
        done += 1
    return done


def add_fid_deltas(rows: list[dict], features: dict, reference_features: np.ndarray, reference: str,
                   resamples: int, confidence: float = 0.95, seed: int = 0) -> int:
    """Give every row ``delta_fid``: its FID minus the reference policy's at the same budget, with the
    percentile interval of a paired bootstrap over seeds (:func:`benchmarks.fid.paired_fid_delta`; one
    seeded draw of resamples shared by every row, the full-cache set resampled with them).
    ``features`` maps (policy, budget) -> ``[num, d]`` features in seed order. Rows without a
    reference run at their budget get None. Returns how many rows got an interval."""
    from benchmarks.fid import bootstrap_indices, fid_bootstrap, paired_fid_delta

    refs = {r["kv_budget"]: r for r in rows if r["policy"] == reference}
    idx = bootstrap_indices(len(reference_features), resamples, seed)
    boots: dict = {}

    def boot(key):
        if key not in boots:
            boots[key] = fid_bootstrap(reference_features, features[key], idx)
        return boots[key]

    done = 0
    for r in rows:
        ref = refs.get(r["kv_budget"])
        if ref is None:
            r["delta_fid"] = None
            continue
        key, ref_key = (r["policy"], r["kv_budget"]), (reference, r["kv_budget"])
        r["delta_fid"] = paired_fid_delta(r["fid"] - ref["fid"], boot(key), boot(ref_key), confidence)
        done += 1
    return done


def run_fidelity(model: LoadedModel, cfg: FidelityConfig, progress: bool = True) -> tuple[dict, dict]:
    """Every (policy, budget) against ``full``, and paired against ``cfg.reference``. Returns
    (report, images) where images maps (policy, budget) -> list of uint8 images (for the grid plot)."""
    from tqdm import tqdm

    requests = make_requests(model, cfg.num, cfg.seed)
    lengths = model.spec.var.scale_lengths()
    with_classes = model.spec.name in CLASSIFIER_MODELS
    with_fid = cfg.fid and with_classes and cfg.num >= 2
    classifier = None
    if with_classes:
        from training.classifier import load_classifier

        classifier = load_classifier()
    others = [p for p in cfg.policies if p != "full"]
    bar = tqdm(total=1 + len(others) * len(cfg.budgets), desc="fidelity", unit="run", disable=not progress)
    full = run_policy(model, requests, "full", 1.0, cfg)
    bar.update(1)
    fid_fn, fid_features = None, None
    if with_fid:
        from benchmarks.fid import ClassifierFeatures, FeatureFID

        fid_fn = FeatureFID([r.image for r in full.results], ClassifierFeatures(classifier))
        fid_features = fid_fn.num_features
    kw = {"fid_fn": fid_fn, "classifier": classifier, "confidence": cfg.confidence}
    full_rec = compare(full, full, lengths, with_classes, **kw)
    rows, images = [], {("full", 1.0): [r.image for r in full.results]}
    features = {}  # (policy, budget) -> per-seed classifier features, for the FID interval
    for budget in cfg.budgets:
        for policy in others:
            bar.set_postfix_str(f"{policy}@{budget}")
            run = run_policy(model, requests, policy, budget, cfg)
            rows.append(compare(run, full, lengths, with_classes, **kw))
            images[(policy, budget)] = [r.image for r in run.results]
            if fid_fn is not None:
                features[(policy, budget)] = fid_fn.features(images[(policy, budget)])
            bar.update(1)
    bar.close()
    reference = cfg.reference if cfg.reference in others else None
    full_rec["delta_psnr"] = full_rec["delta_ssim"] = None  # full is what the metrics are measured against
    if reference is not None:
        add_paired_deltas(rows, reference, cfg.confidence)
        if fid_fn is not None and cfg.fid_bootstrap > 0:
            add_fid_deltas(rows, features, fid_fn.reference_features, reference, cfg.fid_bootstrap, cfg.confidence,
                           seed=cfg.seed)
    else:
        for r in rows:
            r["delta_psnr"] = r["delta_ssim"] = None
    from benchmarks.common import machine, today

    report = {
        "model": model.spec.name,
        "weights": model.source,
        "num": cfg.num,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "machine": machine(),
        "date": today(),
        "psnr_cap": PSNR_CAP,
        "reference": reference,
        "confidence": cfg.confidence,
        "conventions": {
            "psnr": "per image on uint8 RGB, peak 255, capped at psnr_cap when identical; mean over seeds",
            "ssim": SSIM_CONVENTION,
            "fid": FID_CONVENTION if with_fid else None,
            "delta": "per-seed difference policy - reference at the same budget and seed; mean and Student "
                     "t-interval (ddof=1, n-1 degrees of freedom)",
            "delta_fid": (f"FID(policy) - FID(reference) on all seeds; interval: percentiles of the same "
                          f"difference over {cfg.fid_bootstrap} paired bootstrap resamples of the seeds "
                          "(full-cache, policy and reference images resampled together)")
            if with_fid and reference is not None and cfg.fid_bootstrap > 0 else None,
        },
        "fid_features": fid_features,
        "torchmetrics": _torchmetrics_version(),
        "full": full_rec,
        "results": rows,
    }
    if cfg.reference is not None and reference is None:
        report["reference_note"] = (f"reference policy {cfg.reference!r} is not among the policies run; "
                                    "no paired deltas")
    return report, images


def _torchmetrics_version() -> str | None:
    try:
        import torchmetrics
    except ImportError:  # pragma: no cover
        return None
    return torchmetrics.__version__


def write_outputs(report: dict, images: dict, cfg: FidelityConfig, json_path: str | None,
                  plot_dir: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot_dir:
        for b in cfg.budgets:
            plot_grid(images, b, cfg.policies, Path(plot_dir) / f"grid_budget_{b:g}.png")
        plot_sweep(report, Path(plot_dir) / "budget_sweep.png")


def _fmt_delta(d: dict | None, digits: int) -> str:
    if d is None:
        return "-"
    if d["low"] is None:  # a single seed: no interval
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f},{d['high']:+.{digits}f}]"


def format_table(report: dict) -> str:
    """A plain text table of the main figures, the conventions as ``#`` lines above it."""
    ref = report.get("reference")
    conf = report.get("confidence", 0.95)
    rows = [report["full"]] + report["results"]
    with_cls = "class_accuracy" in report["full"]
    with_fid = report["full"].get("fid") is not None
    conv = report.get("conventions", {})
    notes = [f"# {report['model']}: {report['num']} seeds per policy (seeds {report['seed']}.."
             f"{report['seed'] + report['num'] - 1}), every metric vs the full cache on the same seeds"]
    if ref is not None:
        notes.append(f"# dPSNR/dSSIM: paired per-seed difference (policy - {ref}) at the same budget: mean "
                     f"[{100 * conf:g}% t-interval]; 'ref' marks the reference")
    else:
        notes.append(f"# no paired deltas: {report.get('reference_note', 'no reference policy')}")
    notes.append(f"# PSNR: {conv.get('psnr', 'uint8 RGB, peak 255')}")
    notes.append(f"# SSIM: {conv.get('ssim', SSIM_CONVENTION)}")
    if with_fid:
        n_feat = report.get("fid_features")
        note = f"# FID: {conv.get('fid', FID_CONVENTION)}; {n_feat}-d features, {report['num']} images per set"
        if n_feat is not None and report["num"] <= n_feat:
            note += " (fewer images than features: rank-deficient covariances, FID biased upwards)"
        notes.append(note)
    notes.append("# KV/full: mean peak KV bytes of a request / full's; cap x: requests a fixed pool admits, "
                 "vs full; tok%: tokens equal to full's")
    head = (f"{'policy':<12} {'budget':>6} {'PSNR':>7} {'dPSNR [CI]':>23} {'SSIM':>6} {'dSSIM [CI]':>26}")
    with_dfid = with_fid and any(r.get("delta_fid") for r in report["results"])
    if with_dfid:
        notes.append(f"# dFID: FID - {ref}'s at the same budget, [{100 * conf:g}% interval of a paired bootstrap "
                     "over seeds]")
    if with_fid:
        head += f" {'FID':>8}"
    if with_dfid:
        head += f" {'dFID [CI]':>23}"
    if with_cls:
        head += f" {'acc':>5}"
    head += f" {'KV/full':>8} {'tok%':>6} {'cap x':>6}"
    lines = [*notes, head]
    for r in rows:
        is_ref = ref is not None and r["policy"] == ref
        dp = "ref" if is_ref else _fmt_delta(r.get("delta_psnr"), 2)
        ds = "ref" if is_ref else _fmt_delta(r.get("delta_ssim"), 4)
        line = f"{r['policy']:<12} {r['kv_budget']:>6g} {r['psnr']:>7.2f} {dp:>23} {r['ssim']:>6.3f} {ds:>26}"
        if with_fid:
            fid = 0.0 if abs(r["fid"]) < 5e-4 else r["fid"]  # float noise around 0 (full vs itself)
            line += f" {fid:>8.3f}"
        if with_dfid:
            df = "ref" if is_ref else _fmt_delta(r.get("delta_fid"), 3)
            line += f" {df:>23}"
        if with_cls:
            line += f" {r['class_accuracy']:>5.2f}"
        line += f" {r['kv_ratio']:>8.3f} {100 * r['token_agreement_all']:>6.1f} {r['capacity_ratio']:>6.2f}"
        lines.append(line)
    return "\n".join(lines)
