"""The two robustness figures: accuracy against severity (the paper's Figure 3) and CE per corruption as bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_vs_severity(models: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Top-1 accuracy (mean over corruptions) at severity 0 (clean) to 5, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, m in models.items():
        per_severity = np.array(list(m["errors"].values()), dtype=float)  # [corruptions, severities]
        acc = [100 * (1 - m["clean_error"])] + list(100 * (1 - per_severity.mean(axis=0)))
        ax.plot(range(len(acc)), acc, marker="o", label=name)
    ax.set_xlabel("corruption severity (0 = clean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(range(len(acc)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Accuracy under corruption")
    return _save(plt, fig, path)


def plot_ce_bars(models: dict[str, dict[str, Any]], path: str | Path, reference: str = "AlexNet") -> Path:
    """Corruption error (% of the reference's) per corruption, grouped bars per model, reference at 100."""
    plt = _pyplot()
    names = list(next(iter(models.values()))["ce"].keys())
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4), dpi=120)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(names))
    for i, (model, m) in enumerate(models.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [m["ce"][c] for c in names], width, label=f"{model} (mCE {m['mce']:.1f})")
    ax.axhline(100, color="k", ls="--", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"CE (% of {reference})")
    ax.legend(fontsize=8)
    ax.set_title("Corruption error per corruption (lower is better)")
    return _save(plt, fig, path)
