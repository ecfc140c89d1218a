"""Fidelity of KV policies against the full cache: same requests, same seeds, every policy.

For each (policy, kv_budget) the harness generates the same requests through an
``ImageEngine`` and compares with the ``full`` run: PSNR and SSIM of the images, token agreement
per scale, class accuracy of the samples (the shape classifier, for ``var-tiny``), the peak KV
bytes of a request measured from the pool (pages it held at its peak, plus the per-step scratch
of the current scale's K/V, as in the engine's results) and their ratio to ``full``, and how
many requests a fixed pool admits at once under the policy's reservation.

Metrics are consistency metrics (policy vs the full cache), like the paper's Table 1: a
lossless policy scores PSNR = ``PSNR_CAP`` and SSIM = 1.

Memory fields: ``kv_peak_bytes`` / ``kv_ratio`` (pool pages at the request's peak plus the
scratch, as the engine reports them), ``kv_pool_*`` (pool pages only), ``quota_pages`` (the
largest sum of per-layer quotas at a scale) and ``request_pages`` (the reservation: also counts
the transient while a layer grows before a later layer shrinks, e.g. when the drafter role
moves to an earlier layer), ``capacity`` (requests the fixed pool admits at once) and
``capacity_ratio`` (full's reservation / this policy's).

    scalekv bench fidelity --model var-tiny --policies full,scalekv,snapkv --budgets 0.1,0.2,0.4 \\
        --num 32 --json out/fidelity.json --plot out/fidelity
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.api import EngineConfig, ImageEngine
from engine.models.registry import LoadedModel
from engine.request import ImageRequest, ImageResult

PSNR_CAP = 100.0  # dB reported for identical images (PSNR is infinite there)
CLASSIFIER_MODELS = ("var-tiny",)  # models whose images the shape classifier can judge

__all__ = ["FidelityConfig", "psnr", "run_fidelity", "ssim", "token_agreement"]


@dataclass
class FidelityConfig:
    """What to compare. Engine knobs are shared by every run so only the policy differs."""

    policies: list[str] = field(default_factory=lambda: ["full", "scalekv", "snapkv", "pyramidkv", "sliding",
                                                         "streaming", "h2o"])
    budgets: list[float] = field(default_factory=lambda: [0.1])
    num: int = 8
    seed: int = 0
    dtype: str = "float32"
    block_size: int = 16
    kv_pool_bytes: int = 128 << 20  # the fixed pool for the concurrency figure
    profile_path: str | None = None
    window_size: int = 16
    pool_kernel: int = 5
    pooling: str = "max"
    budget_delta: float | None = None

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num: must be >= 1, got {self.num}")
        if not self.policies:
            raise ValueError("policies: give at least one policy")
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets: each must be a fraction in (0, 1], got {b}")

    def engine_config(self, policy: str, kv_budget: float) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, kv_pool_bytes=self.kv_pool_bytes, policy=policy,
                            kv_budget=kv_budget, dtype=self.dtype, attention_backend="auto",
                            profile_path=self.profile_path, window_size=self.window_size,
                            pool_kernel=self.pool_kernel, pooling=self.pooling, budget_delta=self.budget_delta)


# --------------------------------------------------------------------------- metrics
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (``PSNR_CAP`` when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004) of two uint8 ``[H, W, 3]`` images: gaussian window, per channel,
    valid region, averaged; constants for a 255 data range. The window shrinks for tiny images."""
    x = torch.from_numpy(a).double().permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[:, None]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x**2
    syy = F.conv2d(y * y, w) - mu_y**2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def token_agreement(a: list[int], b: list[int], lengths: list[int]) -> list[float]:
    """Fraction of equal tokens per scale (tokens are flattened coarse to fine)."""
    out, start = [], 0
    ta, tb = np.asarray(a), np.asarray(b)
    for n in lengths:
        out.append(float(np.mean(ta[start : start + n] == tb[start : start + n])))
        start += n
    return out


def class_accuracy(results: list[ImageResult]) -> float:
    from training.classifier import load_classifier, predict

    x = torch.stack([torch.from_numpy(r.image) for r in results]).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = predict(load_classifier(), x)
    labels = torch.tensor([r.class_label for r in results])
    return float((pred == labels).float().mean())


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


def compare(run: PolicyRun, full: PolicyRun, lengths: list[int], with_classes: bool) -> dict:
    """The metrics of one run against the full-cache run."""
    pairs = list(zip(run.results, full.results))
    agree = np.mean([token_agreement(r.tokens, f.tokens, lengths) for r, f in pairs], axis=0)
    rec = {
        "policy": run.policy,
        "kv_budget": run.kv_budget,
        "psnr": float(np.mean([psnr(r.image, f.image) for r, f in pairs])),
        "ssim": float(np.mean([ssim(r.image, f.image) for r, f in pairs])),
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
    }
    if with_classes:
        rec["class_accuracy"] = class_accuracy(run.results)
    return rec


def run_fidelity(model: LoadedModel, cfg: FidelityConfig, progress: bool = True) -> tuple[dict, dict]:
    """Every (policy, budget) against ``full``. Returns (report, images) where images maps
    (policy, budget) -> list of uint8 images (for the grid plot)."""
    from tqdm import tqdm

    requests = make_requests(model, cfg.num, cfg.seed)
    lengths = model.spec.var.scale_lengths()
    with_classes = model.spec.name in CLASSIFIER_MODELS
    others = [p for p in cfg.policies if p != "full"]
    bar = tqdm(total=1 + len(others) * len(cfg.budgets), desc="fidelity", unit="run", disable=not progress)
    full = run_policy(model, requests, "full", 1.0, cfg)
    bar.update(1)
    full_rec = compare(full, full, lengths, with_classes)
    rows, images = [], {("full", 1.0): [r.image for r in full.results]}
    for budget in cfg.budgets:
        for policy in others:
            bar.set_postfix_str(f"{policy}@{budget}")
            run = run_policy(model, requests, policy, budget, cfg)
            rows.append(compare(run, full, lengths, with_classes))
            images[(policy, budget)] = [r.image for r in run.results]
            bar.update(1)
    bar.close()
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
        "full": full_rec,
        "results": rows,
    }
    return report, images


# --------------------------------------------------------------------------- plots
def plot_grid(images: dict, budget: float, policies: list[str], path: str | Path, max_cols: int = 8) -> None:
    """Rows: full, then each policy at ``budget``; columns: the same requests (same seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("full", 1.0)] + [(p, budget) for p in policies if p != "full" and (p, budget) in images]
    cols = min(max_cols, len(images[("full", 1.0)]))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.2, 1.3 * len(rows)), squeeze=False)
    for i, key in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(images[key][j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(key[0] if key[0] == "full" else f"{key[0]}\n{key[1]:g}", fontsize=8)
    fig.suptitle(f"full cache vs policies at kv_budget {budget:g} (same seeds per column)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(report: dict, path: str | Path) -> None:
    """PSNR and SSIM vs kv_budget, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    policies = sorted({r["policy"] for r in report["results"]})
    for p in policies:
        pts = sorted((r["kv_budget"], r["psnr"], r["ssim"]) for r in report["results"] if r["policy"] == p)
        xs = [x[0] for x in pts]
        axes[0].plot(xs, [x[1] for x in pts], marker="o", label=p)
        axes[1].plot(xs, [x[2] for x in pts], marker="o", label=p)
    for ax, name in zip(axes, ("PSNR vs full (dB)", "SSIM vs full")):
        ax.set_xlabel("kv_budget")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: fidelity to the full cache, {report['num']} images")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, images: dict, cfg: FidelityConfig, json_path: str | None,
                  plot_dir: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if plot_dir:
        for b in cfg.budgets:
            plot_grid(images, b, cfg.policies, Path(plot_dir) / f"grid_budget_{b:g}.png")
        plot_sweep(report, Path(plot_dir) / "budget_sweep.png")


def format_table(report: dict) -> str:
    """A plain text table of the main figures."""
    head = f"{'policy':<10} {'budget':>6} {'PSNR':>7} {'SSIM':>6} {'tok%':>6} {'KV/full':>8} {'cap x':>6}"
    with_cls = "class_accuracy" in report["full"]
    if with_cls:
        head += f" {'acc':>5}"
    lines = [head]
    for r in [report["full"]] + report["results"]:
        line = (f"{r['policy']:<10} {r['kv_budget']:>6.2f} {r['psnr']:>7.2f} {r['ssim']:>6.3f} "
                f"{100 * r['token_agreement_all']:>6.1f} {r['kv_ratio']:>8.3f} {r['capacity_ratio']:>6.2f}")
        if with_cls:
            line += f" {r['class_accuracy']:>5.2f}"
        lines.append(line)
    return "\n".join(lines)
