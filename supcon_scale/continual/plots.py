"""The continual figures: the accuracy matrix of each method, and average accuracy per stage with 95% intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from supcon_scale.evaluation.plots import _pyplot, _save

LABELS = {"scr": "SCR (SupCon + NCM)", "er": "ER (cross-entropy)"}


def plot_matrices(matrices: dict[str, np.ndarray], path: str | Path) -> Path:
    """One heatmap per method of a[i][j] (mean over seeds): rows after task i, columns test classes of task j."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), dpi=120, squeeze=False)
    for ax, (method, a) in zip(axes[0], matrices.items(), strict=True):
        t = len(a)
        image = ax.imshow(np.ma.masked_invalid(100 * a), vmin=0, vmax=100, cmap="viridis")
        for i in range(t):
            for j in range(i + 1):
                ax.text(
                    j,
                    i,
                    f"{100 * a[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if a[i, j] < 0.6 else "black",
                )
        ax.set_xticks(range(t), [str(j + 1) for j in range(t)])
        ax.set_yticks(range(t), [str(i + 1) for i in range(t)])
        ax.set_xlabel("test classes of task j")
        ax.set_ylabel("after training task i")
        ax.set_title(LABELS.get(method, method), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    fig.suptitle("Accuracy matrix a[i][j] (mean over seeds)", fontsize=10)
    return _save(plt, fig, path, tight=False)  # tight_layout cannot place a colorbar shared by several axes


def plot_stage_accuracy(stages: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Average accuracy over the tasks seen so far, after each stage: mean over seeds, shaded 95% t-interval."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, (mean, half) in stages.items():
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, 100 * mean, marker="o", label=LABELS.get(method, method))
        if np.isfinite(half).all():
            ax.fill_between(x, 100 * (mean - half), 100 * (mean + half), alpha=0.2)
    ax.set_xlabel("stage (tasks learned)")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_xticks(np.arange(1, len(mean) + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Class-incremental: average accuracy per stage (95% t-interval over seeds)", fontsize=9)
    return _save(plt, fig, path)
