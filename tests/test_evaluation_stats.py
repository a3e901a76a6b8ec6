"""Paired comparisons: the exact McNemar test against scipy's binomial distribution and hand-computed cases, and
the demo's comparison lines built on it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from supcon_scale.evaluation.stats import mcnemar, paired_difference


def _pair(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Per-image correctness of two models with the given cell counts, shuffled so that order cannot matter."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    order = np.random.default_rng(0).permutation(len(a))
    return [a[i] for i in order], [b[i] for i in order]


@pytest.mark.parametrize(("only_a", "only_b"), [(4, 15), (15, 4), (30, 31), (0, 9), (1, 1)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(only_a, only_b):
    a, b = _pair(300, only_a, only_b, 41)
    got = mcnemar(a, b)
    n = only_a + only_b
    # two-sided exact test at p = 1/2: twice the smaller tail, capped at 1 (the distribution is symmetric)
    want = min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5))
    assert (got["n"], got["only_a"], got["only_b"]) == (300 + n + 41, only_a, only_b)
    assert got["p_value"] == pytest.approx(want, rel=1e-12)
    assert got["p_value"] == pytest.approx(binomtest(only_a, n).pvalue, rel=1e-12)


def test_mcnemar_hand_computed():
    # 1 vs 5 discordant: 2 * (C(6,0) + C(6,1)) / 2^6 = 14 / 64
    assert mcnemar(*_pair(10, 1, 5, 2))["p_value"] == pytest.approx(14 / 64, rel=1e-12)
    # 0 vs 6: 2 / 64; 3 vs 3: 1
    assert mcnemar(*_pair(10, 0, 6, 2))["p_value"] == pytest.approx(2 / 64, rel=1e-12)
    assert mcnemar(*_pair(10, 3, 3, 2))["p_value"] == pytest.approx(1.0, rel=1e-12)


def test_paired_difference_matches_the_published_newcombe_interval():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8: complete response
    # before and after consolidation therapy (Cavo et al. 2012), the paired table [[59, 6], [16, 80]]: the
    # Newcombe square-and-add interval of the difference is -0.0621 (95% CI -0.1186 to -0.0046).
    got = paired_difference(*_pair(59, 6, 16, 80))
    assert got["n"] == 161 and got["difference"] == pytest.approx(-10 / 161, abs=1e-12)
    assert got["interval"] == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    swapped = paired_difference(*_pair(59, 16, 6, 80))  # A and B exchanged: the interval mirrors
    assert swapped["interval"] == pytest.approx((0.0046, 0.1186), abs=5e-5)
    same = paired_difference(*_pair(30, 0, 0, 5))
    assert same["difference"] == 0 and same["interval"][0] < 0 < same["interval"][1]


def test_no_discordant_image_is_p_one_not_an_error():
    a = [True, False, True, True]
    assert mcnemar(a, a) == {"n": 4, "only_a": 0, "only_b": 0, "p_value": 1.0}
    assert mcnemar([], [])["p_value"] == 1.0


def test_models_scored_on_different_images_are_refused():
    with pytest.raises(ValueError, match="mcnemar: the two models were scored on 3 and 2 images"):
        mcnemar([True, True, False], [True, False])


def test_the_demo_reports_the_p_value_beside_both_intervals():
    from supcon_scale.demo import comparisons

    supcon, ce = _pair(340, 2, 12, 6)  # 342 vs 352 right of 360: the intervals overlap, the pairing decides
    few_s, few_ce = _pair(300, 10, 11, 39)

    def row(correct):
        return {"top1": sum(correct) / len(correct), "num_val": len(correct), "val_correct": correct}

    out = comparisons({"supcon": row(supcon), "cross_entropy": row(ce)},
                      {"supcon": row(few_s), "cross_entropy": row(few_ce)})  # fmt: skip
    assert [(c["probe"], c["only_a"], c["only_b"]) for c in out] == [("all labels", 2, 12), ("few labels", 10, 11)]
    p_all = binomtest(2, 14).pvalue  # 0.0129
    assert out[0]["p_value"] == pytest.approx(p_all, rel=1e-12) and out[0]["verdict"].startswith("lower")
    assert out[1]["verdict"] == "no significant difference (p >= 0.05)"
    assert (
        "95.00 [92.2, 96.8] (n=360) vs 97.78 [95.7, 98.9] (n=360); exact McNemar p=0.0129 on the 14 images only "
        "one gets right (2 SupCon, 12 cross-entropy): lower than cross-entropy (p < 0.05)" in out[0]["line"]
    )
