"""Continual-learning metrics as the field reports them, from the accuracy matrix a[i][j].

a[i][j] is the accuracy on task j's test classes after training on task i (j <= i; NaN above the diagonal).
Average accuracy after stage i: mean_{j<=i} a[i][j]; final average accuracy: the last of those. Average forgetting
(Chaudhry et al. 2018): mean over j < T-1 of max_{l<T-1} a[l][j] - a[T-1][j]. Average incremental accuracy: the
mean of the per-stage averages. Intervals over seeds: Student's t, mean +- t_{0.975, n-1} s / sqrt(n), as the
authors' `experiment/metrics.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def as_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Rows of a[i][j] (None or NaN above the diagonal) as a [T, T] float array with NaN above the diagonal."""
    a = np.array([[math.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"the accuracy matrix must be square, got shape {a.shape}")
    a[np.triu_indices(len(a), 1)] = math.nan
    if np.isnan(a[np.tril_indices(len(a))]).any():
        raise ValueError("the accuracy matrix has a missing entry on or below the diagonal")
    return a


def stage_accuracy(a: np.ndarray) -> np.ndarray:
    """Average accuracy after each stage i: the mean of a[i][0..i]."""
    return np.array([a[i, : i + 1].mean() for i in range(len(a))])


def final_average_accuracy(a: np.ndarray) -> float:
    return float(stage_accuracy(a)[-1])


def average_forgetting(a: np.ndarray) -> float:
    """mean_{j<T-1} (max_{l<T-1} a[l][j] - a[T-1][j]); NaN for a single task (nothing can be forgotten)."""
    t = len(a)
    if t < 2:
        return math.nan
    return float(np.mean([np.nanmax(a[j : t - 1, j]) - a[t - 1, j] for j in range(t - 1)]))


def average_incremental_accuracy(a: np.ndarray) -> float:
    return float(stage_accuracy(a).mean())


def summarize(a: np.ndarray) -> dict[str, Any]:
    return {
        "final_average_accuracy": final_average_accuracy(a),
        "average_forgetting": average_forgetting(a),
        "average_incremental_accuracy": average_incremental_accuracy(a),
        "stage_accuracy": stage_accuracy(a).tolist(),
    }


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval over independent runs; half-width NaN for one run."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)
