"""KV policies compared at matched memory, not at matched nominal budget.

``scalekv bench fidelity`` runs every policy at the same ``kv_budget``, the fraction of tokens the
paper's Table 1 compares at. What a server pays for, though, is the pool pages a request holds at
its peak, and at one nominal budget the policies do not hold the same: a uniform baseline keeps
``U`` tokens in every layer and each layer's pages are its own, so page alignment rounds every
layer up (var-deep at 4%: 17 tokens a layer fill 2 pages of 16, 128 pages a request), while
ScaleKV's per-(scale, layer) quotas share the request's pages (72 at 4%). This script pairs each
baseline row with the row of the chosen policy (``scalekv`` by default) that holds the most memory
**without exceeding** the baseline's measured peak (``kv_ratio``, scratch included), seed by seed.

Reports can come from several runs (e.g. the policy at extra budgets chosen with ``scalekv plan``
so its peak meets the baselines'); they must share the model, the weights and the seeds, which the
script checks, and the engine is deterministic, so the full-cache reference is the same in each.

A baseline that leaves slots of its pages empty can be run at the budget that fills them (var-deep:
0.0755 keeps 32 tokens a layer in the same 2 pages as 0.04's 17); give that report too, so the
comparison is against the most the same memory can hold.

    python -m benchmarks.iso_memory docs/models/var-deep/card/fidelity_policies_phase4.json \\
        docs/models/var-deep/card/fidelity_iso_memory_phase4.json \\
        docs/models/var-deep/card/fidelity_pagefill_phase4.json --against h2o,snapkv --plot out/frontier.png

``--plot`` draws the memory-fidelity frontier of every policy in the reports: mean PSNR vs full
against the measured peak KV per request, one line per policy, so a policy that is above another
at the same x is the better use of the same pool. There are no error bars: every policy runs on the
same seeds, and the seed-to-seed spread they share (+-0.5 dB on 200 seeds) would hide differences
the paired intervals of the table resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.depth_gain import PAPER_BASELINES, report_parser
from benchmarks.fidelity_plots import save_figure
from benchmarks.stats import paired_delta


def _identity(report: dict) -> tuple:
    return report["model"], report.get("weights"), report["seed"], report["num"]


def merge_rows(reports: list[dict]) -> list[dict]:
    """All result rows of reports of one model, weights and seed set (ValueError otherwise). A
    (policy, budget) measured twice keeps the first row."""
    if not reports:
        raise ValueError("reports: need at least one fidelity report")
    first = _identity(reports[0])
    rows: dict[tuple[str, float], dict] = {}
    for rep in reports:
        if _identity(rep) != first:
            raise ValueError(f"reports: model/weights/seed/num differ: {_identity(rep)} vs {first}")
        for r in rep["results"]:
            rows.setdefault((r["policy"], r["kv_budget"]), r)
    return list(rows.values())


def matched(rows: list[dict], policy: str = "scalekv", against: tuple[str, ...] = PAPER_BASELINES,
            confidence: float = 0.95) -> list[dict]:
    """For every baseline row, the ``policy`` row of the largest peak KV that is <= the baseline's,
    and the paired per-seed PSNR difference (policy - baseline). Baseline rows with no such policy
    row are reported with ``policy_budget`` None."""
    mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["kv_ratio"])
    out = []
    for base in sorted((r for r in rows if r["policy"] in against), key=lambda r: (r["kv_budget"], r["policy"])):
        fits = [r for r in mine if r["kv_ratio"] <= base["kv_ratio"] + 1e-12]
        rec = {"baseline": base["policy"], "baseline_budget": base["kv_budget"], "baseline_kv": base["kv_ratio"],
               "baseline_psnr": base["psnr"], "policy": policy, "policy_budget": None}
        if fits:
            m = fits[-1]
            d = paired_delta(m["psnr_per_seed"], base["psnr_per_seed"], confidence)
            rec.update(policy_budget=m["kv_budget"], policy_kv=m["kv_ratio"], policy_psnr=m["psnr"],
                       gain_db=d.mean, low=d.low, high=d.high, seeds=d.n)
        out.append(rec)
    return out


def frontier(rows: list[dict]) -> dict[str, list[dict]]:
    """Per policy, its rows as ``{kv, budget, psnr}`` points sorted by measured peak KV (then budget:
    a uniform policy holds the same pages at several budgets)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["policy"], []).append({"kv": r["kv_ratio"], "budget": r["kv_budget"], "psnr": r["psnr"]})
    return {p: sorted(pts, key=lambda q: (q["kv"], q["budget"])) for p, pts in sorted(out.items())}


def plot_frontier(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Mean PSNR vs full against peak KV per request (fraction of full), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, pts in frontier(rows).items():
        ax.plot([q["kv"] for q in pts], [q["psnr"] for q in pts], marker="o", ms=4, lw=1.2, label=policy)
    ax.set_xlabel("peak KV per request (fraction of full, scratch included)")
    ax.set_ylabel("PSNR vs full cache (dB)")
    ax.set_title(title or "memory-fidelity frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(points: list[dict]) -> str:
    lines = ["| baseline | its budget | its KV/full | its PSNR | policy budget | policy KV/full | policy PSNR | "
             "gain dB [95% CI] | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        head = (f"| {p['baseline']} | {p['baseline_budget']:g} | {p['baseline_kv']:.3f} | {p['baseline_psnr']:.2f} | ")
        if p["policy_budget"] is None:
            lines.append(head + "- | - | - | no policy row fits | - |")
            continue
        lines.append(head + f"{p['policy']} {p['policy_budget']:g} | {p['policy_kv']:.3f} | {p['policy_psnr']:.2f} | "
                     f"{p['gain_db']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] | {p['seeds']} |")
    return "\n".join(lines)


def main() -> None:
    ap = report_parser(__doc__, "the policy matched to each baseline")
    ap.add_argument("--json", help="also write the matched rows here")
    ap.add_argument("--plot", help="also draw every policy's PSNR against its peak KV (a PNG) here")
    args = ap.parse_args()
    against = tuple(p for p in args.against.split(",") if p)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    rows = merge_rows(reports)
    if args.plot:
        r0 = reports[0]
        plot_frontier(rows, args.plot, f"{r0['model']}: PSNR vs memory, the same {r0['num']} seeds per point")
        print(f"plot: {args.plot}")
    points = matched(rows, args.policy, against)
    if not points:
        raise SystemExit(f"no report holds one of {', '.join(against)}")
    print(table(points))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
