"""Figures of the fidelity harness: image grids per budget and the budget sweep."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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
    save_figure(fig, path, dpi=100)


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
    save_figure(fig, path)


