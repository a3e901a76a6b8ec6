"""Honest comparisons: an accuracy with its n and a 95% Wilson score interval, and two models scored on the same
images compared by an exact McNemar test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    """Whether the two accuracies' 95% intervals overlap, for accuracies measured on *different* images (a
    conservative test). Two models scored on the same images are compared by `mcnemar`, which uses the pairing."""
    lo_a, hi_a = accuracy_interval(a, n_a)
    lo_b, hi_b = accuracy_interval(b, n_b)
    return lo_a <= hi_b and lo_b <= hi_a


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of two classifiers scored on the same images (McNemar 1947, in its exact binomial form).

    Only the discordant images carry information: under the null hypothesis that both models are equally accurate,
    the images only A gets right are Binomial(discordant, 1/2). The two-sided p-value is scipy's exact binomial
    test of that count; with no discordant image the models agree everywhere and p is 1.
    """
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b):
        raise ValueError(f"mcnemar: the two models were scored on {len(correct_a)} and {len(correct_b)} images")
    only_a = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if b and not a)
    discordant = only_a + only_b
    p = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {"n": len(correct_a), "only_a": only_a, "only_b": only_b, "p_value": float(p)}


def paired_difference(correct_a: Sequence[bool], correct_b: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """accuracy(A) - accuracy(B) on the same images with its 95% interval by Newcombe's square-and-add method for
    paired proportions (Newcombe 1998, Stat. Med. 17:2635, method 10): each accuracy's Wilson interval, combined
    with the correlation of the pair (continuity-corrected phi), so it agrees with `mcnemar` on the same images.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired_difference: the two models were scored on {len(correct_a)} and {len(correct_b)} "
                         "images")  # fmt: skip
    n = len(correct_a)
    pairs = list(zip(correct_a, correct_b, strict=True))
    both = sum(1 for a, b in pairs if a and b)
    only_a = sum(1 for a, b in pairs if a and not b)
    only_b = sum(1 for a, b in pairs if b and not a)
    neither = n - both - only_a - only_b
    if n == 0:
        return {"n": 0, "difference": 0.0, "interval": (-1.0, 1.0)}
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_a, n, z), wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:  # the correlation of the two accuracies, shrunk by n/2 when positive (Newcombe's continuity correction)
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    upper = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return {"n": n, "difference": d, "interval": (max(-1.0, lower), min(1.0, upper))}
