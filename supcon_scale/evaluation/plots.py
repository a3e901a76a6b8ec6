"""The figures: accuracy against severity (the paper's Figure 3), CE per corruption as bars, and a run's training
curves and time shares from its metrics.jsonl (`supcon-scale plot`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from supcon_scale import arguments
from supcon_scale.files import write_replacing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path, tight: bool = True) -> Path:
    if tight:  # also keeps a legend placed outside the axes inside the saved image
        fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # `--out map`: matplotlib would add `.png` to the temporary's name and leave `map` empty
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower()  # the format from the name asked for, not from the temporary's
    write_replacing(path, lambda tmp: fig.savefig(tmp, format=fmt))  # a planted link is replaced, never followed
    plt.close(fig)
    return path


def accuracy_vs_severity_figure(models: dict[str, dict[str, Any]], severities: list[int] | tuple[int, ...]) -> Any:
    """The figure: top-1 accuracy (mean over corruptions) at 0 (clean) and at each severity scored, one line per
    model; the x axis places and labels the severities as scored (1, 3, 5 stay 1, 3, 5)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [0, *severities]
    for name, m in models.items():
        per_severity = np.array(list(m["errors"].values()), dtype=float)  # [corruptions, severities]
        if per_severity.shape[1] != len(severities):
            raise ValueError(f"{name}: errors at {per_severity.shape[1]} severities, but {len(severities)} are named")
        acc = [100 * (1 - m["clean_error"])] + list(100 * (1 - per_severity.mean(axis=0)))
        ax.plot(xs, acc, marker="o", label=name)
    ax.set_xlabel("corruption severity (0 = clean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(xs, labels=[str(x) for x in xs])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Accuracy under corruption")
    return fig


def plot_accuracy_vs_severity(
    models: dict[str, dict[str, Any]], path: str | Path, severities: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5)
) -> Path:
    """`accuracy_vs_severity_figure` saved as a PNG (the paper's Figure 3)."""
    return _save(_pyplot(), accuracy_vs_severity_figure(models, severities), path)


def plot_ce_bars(models: dict[str, dict[str, Any]], path: str | Path, reference: str = "AlexNet") -> Path:
    """Corruption error (% of the reference's) per corruption, grouped bars per model, reference at 100."""
    plt = _pyplot()
    names = list(next(iter(models.values()))["ce"].keys())
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4), dpi=120)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(names))
    for i, (model, m) in enumerate(models.items()):
        ax.bar(
            x + i * width - 0.4 + width / 2, [m["ce"][c] for c in names], width, label=f"{model} (mCE {m['mce']:.1f})"
        )
    ax.axhline(100, color="k", ls="--", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"CE (% of {reference})")
    ax.legend(fontsize=8)
    ax.set_title("Corruption error per corruption (lower is better)")
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Training curves from metrics.jsonl (`supcon-scale plot RUN_DIR`)

CURVES = (  # (metrics.jsonl field, y label, log scale)
    ("loss", "training loss", False),
    ("lr", "learning rate", False),
    ("views_per_s", "views / s (all ranks)", False),
    ("knn_top1", "kNN top-1 accuracy (val)", False),
)
SHARES = (("data_share", "waiting for data"), ("compute_share", "forward+loss+backward"), ("optim_share", "optimizer"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a step logged twice (a resumed run replays the steps after its checkpoint) keeps
    its last row, and a torn last line (a killed run) is ignored."""
    rows: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[(row["step"], "knn_top1" in row)] = row
    return [rows[k] for k in sorted(rows)]


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """`training_curves_figure` saved as a PNG."""
    return _save(_pyplot(), training_curves_figure(rows, title), path)


def training_curves_figure(rows: list[dict[str, Any]], title: str = "") -> Any:
    """Loss, learning rate, views/s and kNN top-1 (with its 95% interval as a band) against the optimizer step."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=120)
    steps = [r["step"] for r in rows]
    pad = max(1, (max(steps) - min(steps)) // 20) if steps else 1
    for ax, (name, label, log) in zip(axes.flat, CURVES, strict=True):
        points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, ms=3)
            band = [(r["step"], *r[f"{name}_interval_95"]) for r in rows if r.get(f"{name}_interval_95") is not None]
            if band:  # the kNN top-1's 95% Wilson interval (knn_top1_interval_95 in the monitor's rows)
                ax.fill_between(*zip(*band, strict=True), alpha=0.25, label="95% interval")
                ax.legend(fontsize=8)
        else:
            hint = " (train.knn_every_epochs)" if name == "knn_top1" else ""
            ax.text(0.5, 0.5, f"no {name} in metrics.jsonl{hint}", ha="center", va="center", transform=ax.transAxes)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        if steps:  # every panel on the run's step range: a kNN curve of one point gets integer steps too
            ax.set_xlim(min(steps) - pad / 2, max(steps) + pad / 2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_time_shares(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Where each log window's wall time went (console.StepClock), stacked; None when the run logged no shares."""
    rows = [r for r in rows if all(r.get(k) is not None for k, _ in SHARES)]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    steps = [r["step"] for r in rows]
    stacks = [[100 * r[k] for r in rows] for k, _ in SHARES]
    other = [max(0.0, 100 - sum(v)) for v in zip(*stacks, strict=True)]
    ax.stackplot(steps, *stacks, other, labels=[label for _, label in SHARES] + ["other (logging, hooks)"], alpha=0.85)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of wall time (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Where the time goes, per log window")
    return _save(plt, fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The PNGs of a run directory's metrics.jsonl: training_curves.png and (when logged) time_shares.png."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a training run's out_dir?)")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics}: no metrics rows yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    written = [plot_training_curves(rows, out / "training_curves.png", title=run_dir.name)]
    shares = plot_time_shares(rows, out / "time_shares.png", title=f"{run_dir.name}: where the time goes")
    return written + ([shares] if shares is not None else [])


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale plot RUN_DIR [--out DIR]`: PNG curves from the run's metrics.jsonl; prints their paths."""
    args = arguments.plot().parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
