"""Honest comparisons: an accuracy with its n and a 95% Wilson score interval, and when two are within noise."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion correct / n (Wilson 1927); (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and keeps a width at 0 and at n correct.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n correct a bound equals p exactly in real numbers but may round past it (1 - 1e-16 at 360/360)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on n images (the count of correct ones is recovered)."""
    return wilson_interval(round(accuracy * n), n)


def format_accuracy(accuracy: float, n: int) -> str:
    """ "97.50 [95.1, 98.7] (n=360)": percent, its 95% Wilson interval and the number of images."""
    lo, hi = accuracy_interval(accuracy, n)
    return f"{100 * accuracy:.2f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"


def within_noise(a: float, n_a: int, b: float, n_b: int) -> bool:
    """Whether the two accuracies' 95% intervals overlap: their difference is then not a finding."""
    lo_a, hi_a = accuracy_interval(a, n_a)
    lo_b, hi_b = accuracy_interval(b, n_b)
    return lo_a <= hi_b and lo_b <= hi_a
