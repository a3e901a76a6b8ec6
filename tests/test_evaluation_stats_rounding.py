"""The accuracy interval recovers the count of correct images exactly (issue 28, item 5): scipy's Wilson interval
of that count is the reference, for every count at small n and for float32 accuracies at ImageNet's n."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from supcon_scale.evaluation.stats import accuracy_interval, format_accuracy


def _scipy(correct: int, n: int) -> tuple[float, float]:
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 49, 100])
def test_every_count_at_small_n(n):
    for correct in range(n + 1):
        assert accuracy_interval(correct / n, n) == pytest.approx(_scipy(correct, n), abs=1e-12), (correct, n)


@pytest.mark.parametrize("n", [10_000, 50_000])
def test_float32_accuracies_at_imagenet_sizes(n):
    """An accuracy that went through a float32 tensor mean is a hair off correct / n: the count must still round."""
    for correct in np.random.default_rng(n).integers(0, n + 1, 60):
        acc = float(np.float32(correct) / np.float32(n))
        assert accuracy_interval(acc, n) == pytest.approx(_scipy(int(correct), n), abs=1e-12), correct


def test_format_names_the_count_and_the_interval_by_hand():
    # 57 of 100: Wilson centre (0.57 + 1.92/200) / 1.0384, half-width 1.96 sqrt(0.2451/100 + 3.84/40000) / 1.0384
    assert format_accuracy(0.57, 100) == "57.00 [47.2, 66.3] (n=100)"
