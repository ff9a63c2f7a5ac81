"""The report's PNG plots (matplotlib, headless): accuracy per epoch, data efficiency, cost vs work.

Each function writes one figure to ``path`` and returns ``[path]`` (or ``[]`` when there is nothing to draw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullLocator

from benchmarks.common import mean_std


def plot_curves(data: dict[str, Any], path: Path) -> list[str]:
    """Mean test accuracy per epoch of every recipe at the main size; ``[]`` when no run kept its curve."""
    main = data["protocol"]["main_per_class"]
    curves: dict[str, list[list[float]]] = {}
    for r in data["runs"]:
        if r["per_class"] == main and all(h is not None for h in r["history"]):
            curves.setdefault(r["recipe"], []).append(r["history"])
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, histories in curves.items():
        epochs = range(1, len(histories[0]) + 1)
        mean = [sum(h[i] for h in histories) / len(histories) for i in range(len(histories[0]))]
        style = (
            "--"
            if data["recipes"][name]["family"] == "anchor"
            else (":" if data["recipes"][name]["family"] == "baseline" else "-")
        )
        ax.plot(list(epochs), mean, style, marker="o", label=data["recipes"][name]["label"])
    seeds = sorted(
        {r["seed"] for r in data["runs"] if r["per_class"] == main and all(h is not None for h in r["history"])}
    )
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Animal-MNIST, {main} labels/class (seeds {seeds})")
    ax.set_xticks(range(1, max(len(h[0]) for h in curves.values()) + 1))
    ax.set_ylim(max(0.0, min(min(min(h) for h in hs) for hs in curves.values()) - 0.02), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return [_save(fig, path)]


def plot_efficiency(data: dict[str, Any], names: list[str], path: Path) -> list[str]:
    """Test accuracy (mean ± std over seeds) vs labelled images per class, for the named recipes."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in names:
        sizes = sorted({r["per_class"] for r in data["runs"] if r["recipe"] == name})
        stats = [
            mean_std([r["final"] for r in data["runs"] if r["recipe"] == name and r["per_class"] == s]) for s in sizes
        ]
        label = data["recipes"][name]["label"] + (" (val pick)" if name == data["pick"] else "")
        ax.errorbar(
            sizes,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    all_sizes = sorted({r["per_class"] for r in data["runs"]})
    ax.set_xticks(all_sizes, [str(s) for s in all_sizes])
    ax.minorticks_off()
    ax.set(xlabel="labelled images per class", ylabel="test accuracy", title="Data efficiency (Animal-MNIST)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, path)]


def plot_scale(data: dict[str, Any], path: Path) -> list[str]:
    """Fashion-MNIST epoch wall time vs training-set size, one line per (recipe, processes)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    keys = sorted({(r["recipe"], r["devices"]) for r in data["runs"]})
    for recipe, devices in keys:
        rows = sorted(
            (r for r in data["runs"] if (r["recipe"], r["devices"]) == (recipe, devices)), key=lambda r: r["size"]
        )
        ax.plot(
            [r["size"] for r in rows],
            [r["epoch_s"] for r in rows],
            marker="o",
            label=f"{recipe}, {devices} process{'es' if devices > 1 else ''}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({r["size"] for r in data["runs"]})
    ax.set_xticks(sizes, [f"{s / 1000:g}k" if s >= 1000 else str(s) for s in sizes])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(
        xlabel="training images (one epoch)", ylabel="epoch wall time (s)", title="Cost vs work (Fashion-MNIST, 64 px)"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return [_save(fig, path)]


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
