"""Where ScaleKV pays off: its PSNR gain over the best baseline, against model depth, in one plot.

Reads ``scalekv bench fidelity --report`` files (one per model, e.g. var-tiny and var-deep), and for
each model and budget pairs the chosen policy (``scalekv``) with the baseline of the highest mean
PSNR at that budget, seed by seed (the fidelity harness runs every policy on the same seeds): the
gain is the mean per-seed difference with its t-interval. Depth comes from the model's registry
entry. Baselines are the paper's (sliding, streaming, h2o, snapkv, pyramidkv), not our own
all-query variants, unless ``--against`` names others.

    python -m benchmarks.depth_gain docs/models/var-tiny/card/fidelity_policies.json \\
        docs/models/var-deep/card/fidelity_policies.json --out docs/depth_gain.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.fidelity_plots import save_figure
from benchmarks.stats import paired_delta

PAPER_BASELINES = ("sliding", "streaming", "h2o", "snapkv", "pyramidkv")


def depth_of(model: str) -> int:
    from engine.models.registry import get_spec

    return get_spec(model).var.depth


def gains(report: dict, policy: str = "scalekv", against: tuple[str, ...] = PAPER_BASELINES,
          confidence: float = 0.95) -> list[dict]:
    """Per budget: the best baseline by mean PSNR and the paired per-seed gain of ``policy`` over it.
    Budgets where ``policy`` or every baseline is missing are skipped."""
    rows = report["results"]
    out = []
    for budget in sorted({r["kv_budget"] for r in rows}):
        at = {r["policy"]: r for r in rows if r["kv_budget"] == budget}
        mine = at.get(policy)
        base = [at[p] for p in against if p in at]
        if mine is None or not base:
            continue
        best = max(base, key=lambda r: r["psnr"])
        delta = paired_delta(mine["psnr_per_seed"], best["psnr_per_seed"], confidence)
        out.append({"model": report["model"], "depth": depth_of(report["model"]), "kv_budget": budget,
                    "policy": policy, "psnr": mine["psnr"], "best_baseline": best["policy"],
                    "best_baseline_psnr": best["psnr"], "gain_db": delta.mean, "low": delta.low, "high": delta.high,
                    "seeds": delta.n})
    return out


def plot(points: list[dict], path: str | Path) -> None:
    """Gain (dB, with its interval) against depth, one line per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for budget in sorted({p["kv_budget"] for p in points}):
        pts = sorted((p for p in points if p["kv_budget"] == budget), key=lambda p: p["depth"])
        xs = [p["depth"] for p in pts]
        ys = [p["gain_db"] for p in pts]
        err = [[p["gain_db"] - p["low"] for p in pts], [p["high"] - p["gain_db"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"kv_budget {budget:g}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layers")
    ax.set_ylabel("PSNR gain over the best baseline (dB)")
    policy = points[0]["policy"] if points else "scalekv"
    ax.set_title(f"{policy} vs the best baseline, by depth (paired per seed, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(points: list[dict]) -> str:
    lines = ["| model | layers | budget | policy PSNR | best baseline | its PSNR | gain dB [95% CI] | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["depth"], p["kv_budget"])):
        lines.append(f"| {p['model']} | {p['depth']} | {p['kv_budget']:g} | {p['psnr']:.2f} | {p['best_baseline']} | "
                     f"{p['best_baseline_psnr']:.2f} | {p['gain_db']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] | "
                     f"{p['seeds']} |")
    return "\n".join(lines)


def report_parser(doc: str, policy_help: str) -> argparse.ArgumentParser:
    """The command line shared by the scripts that read fidelity reports: the report files, the
    policy under study and the baselines it is measured against."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="fidelity report JSON files (scalekv bench fidelity --report)")
    ap.add_argument("--policy", default="scalekv", help=f"{policy_help} (default: scalekv)")
    ap.add_argument("--against", default=",".join(PAPER_BASELINES),
                    help="comma-separated baselines (default: the paper's)")
    return ap


def main() -> None:
    ap = report_parser(__doc__, "the policy whose gain is plotted")
    ap.add_argument("--out", default="out/depth_gain.png", help="the plot (default: out/depth_gain.png)")
    args = ap.parse_args()
    against = tuple(p for p in args.against.split(",") if p)
    points = [g for path in args.reports for g in gains(json.loads(Path(path).read_text()), args.policy, against)]
    if not points:
        raise SystemExit(f"no report holds both {args.policy!r} and one of {', '.join(against)}")
    plot(points, args.out)
    print(table(points))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
