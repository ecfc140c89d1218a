"""Load test outputs: the comparison table, the plots and the JSON report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.load_records import RATIO_FIELDS


# --------------------------------------------------------------------------- outputs
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _rate_str(rate: float | str) -> str:
    return rate if isinstance(rate, str) else format(rate, "g")


def format_table(report: dict) -> str:
    """A plain text table, one row per (rate, policy), then the ratios to the baseline."""
    head = (f"{'policy':<14} {'rate':>6} {'ok/n':>7} {'img/s':>8} {'e2e p50':>8} {'p90':>7} {'p99':>7} "
            f"{'ttfs p50':>8} {'p90':>7} {'p99':>7} {'run pk':>6} {'mean':>6} {'KV peak MiB':>11} {'pool%':>6} "
            f"{'preempt':>7} {'err':>4}")
    lines = [f"{report['model']} ({report['mode']}), {report['workload']['num_requests']} requests, burstiness "
             f"{report['workload']['burstiness']:g}, max concurrency {report['workload']['max_concurrency']}, pool "
             f"{report['pool']['total_bytes'] / 2**20:.1f} MiB ({report['pool']['num_pages']} pages)", head]
    for r in report["runs"]:
        s = r["summary"]
        e, t = s["e2e_s"], s["ttfs_s"]
        lines.append(
            f"{r['label']:<14} {_rate_str(r['request_rate']):>6} "
            f"{s['completed']:>3}/{s['num_requests']:<3} {s['images_per_s']:>8.3f} {_fmt(e['p50']):>8} "
            f"{_fmt(e['p90']):>7} {_fmt(e['p99']):>7} {_fmt(t['p50']):>8} {_fmt(t['p90']):>7} {_fmt(t['p99']):>7} "
            f"{s['running_peak']:>6} {s['running_mean']:>6.2f} {s['kv_peak_bytes'] / 2**20:>11.2f} "
            f"{100 * s['pool_usage_peak']:>6.1f} {s['preemptions']:>7} {s['errors']:>4}")
    if report["ratios"]:
        lines.append("")
        lines.append(f"ratios to {report['baseline']} (same stream, same pool):")
        for q in report["ratios"]:
            parts = [f"{k} {_fmt(q[k], '.2f')}x" for k in RATIO_FIELDS]
            lines.append(f"  {q['label']} at {_rate_str(q['request_rate'])} req/s: " + ", ".join(parts))
    sampled = [f"{r['label']} at {_rate_str(r['request_rate'])}" for r in report["runs"]
               if "sampled" in r["summary"]["kv_peak_source"]]
    if sampled:
        lines.append(f"note: KV peak sampled between steps (a lower bound) for: {', '.join(sampled)}")
    if report["mode"] != "local-engine":
        lines.append("note: requests running on a cluster are sampled between steps (lower bounds)")
    errs = [(r["label"], m) for r in report["runs"] for m in r["summary"]["error_messages"]]
    for label, m in errs[:5]:
        lines.append(f"error ({label}): {m}")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pool_usage(report: dict, path: str | Path) -> None:
    """Pool usage (pages used / pool) and requests running over time, one line per policy;
    one column per request rate."""
    plt = _plt()
    rates = list(dict.fromkeys(r["request_rate"] for r in report["runs"]))
    fig, axes = plt.subplots(2, len(rates), figsize=(5.5 * len(rates), 6), squeeze=False, sharex="col")
    pages = report["pool"]["num_pages"] or 1
    for j, rate in enumerate(rates):
        for r in (r for r in report["runs"] if r["request_rate"] == rate):
            tl = r["timeline"]
            axes[0][j].step(tl["t_s"], [100 * u / pages for u in tl["used_pages"]], where="post", label=r["label"])
            xs, ys = _running_series(tl)
            axes[1][j].step(xs, ys, where="post", label=r["label"])
        axes[0][j].set_title(f"request rate {_rate_str(rate)} req/s")
        axes[0][j].set_ylabel("pool pages in use (%)")
        axes[1][j].set_ylabel("requests running")
        axes[1][j].set_xlabel("time (s)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: KV pool usage over time ({report['pool']['total_bytes'] / 2**20:.0f} MiB pool)")
    _save(fig, plt, path)


def _running_series(tl: dict) -> tuple[list[float], list[int]]:
    """Requests running as a step function: a step sample holds from the step's start."""
    xs, ys = [], []
    for t, step, n in zip(tl["t_s"], tl["step_s"], tl["running"]):
        xs.append(t - step)
        ys.append(n)
    if xs:
        xs.append(tl["t_s"][-1])
        ys.append(0 if tl["step_s"][-1] else ys[-1])
    return xs, ys


def plot_latency_cdf(report: dict, path: str | Path) -> None:
    """CDF of end-to-end latency (solid) and time to first scale (dashed) per policy, at the
    highest request rate of the run."""
    plt = _plt()
    rates = list(dict.fromkeys(r["request_rate"] for r in report["runs"]))
    rate = rates[-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(r for r in report["runs"] if r["request_rate"] == rate):
        color = f"C{i}"
        for key, style in (("e2e_s", "-"), ("ttfs_s", "--")):
            xs = np.sort([q[key] for q in r["requests"] if q["ok"] and q[key] is not None])
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", linestyle=style, color=color,
                        label=f"{r['label']} {'end to end' if key == 'e2e_s' else 'first scale'}")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"latency CDF at {_rate_str(rate)} req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def plot_throughput(report: dict, path: str | Path) -> None:
    """Images/s and p50 latency vs request rate, one line per policy (a sweep)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    finite = [float(r["request_rate"]) for r in report["runs"] if not math.isinf(float(r["request_rate"]))]
    x_inf = 2 * max(finite) if finite else 1.0  # "inf" (all at once) is drawn past the largest rate
    has_inf = len(finite) < len(report["runs"])

    def x_of(rate) -> float:
        return x_inf if math.isinf(float(rate)) else float(rate)

    for label in dict.fromkeys(r["label"] for r in report["runs"]):
        pts = [(x_of(r["request_rate"]), r["summary"]) for r in report["runs"] if r["label"] == label]
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["images_per_s"] for p in pts], marker="o", label=label)
        axes[1].plot(xs, [p[1]["e2e_s"]["p50"] for p in pts], marker="o", label=label)
    axes[0].set_ylabel("images/s")
    axes[1].set_ylabel("end-to-end latency p50 (s)")
    ticks = sorted({x_of(r["request_rate"]) for r in report["runs"]})
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(ticks, ["inf" if t == x_inf and has_inf else f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: throughput vs request rate")
    _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: str | None, plot_dir: str | None) -> list[str]:
    """The JSON report and the plots; returns the paths written."""
    import json

    written = []
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
        written.append(str(json_path))
    if plot_dir:
        d = Path(plot_dir)
        plot_pool_usage(report, d / "pool_usage.png")
        plot_latency_cdf(report, d / "latency_cdf.png")
        written += [str(d / "pool_usage.png"), str(d / "latency_cdf.png")]
        if len({r["request_rate"] for r in report["runs"]}) > 1:
            plot_throughput(report, d / "throughput_vs_rate.png")
            written.append(str(d / "throughput_vs_rate.png"))
    return written


