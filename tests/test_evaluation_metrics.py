"""mCE / relative mCE against Hendrycks & Dietterich 2019 (ICLR) and hand-computed cases; kNN against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supcon_scale.evaluation.knn import knn_scores
from supcon_scale.evaluation.robustness import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    CORRUPTIONS,
    corruption_errors_to_mce,
    defined_corruptions,
)

PAPER_ALEXNET = {  # typed in again from the ImageNet-C paper's AlexNet errors, not imported from the code under test
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip


def test_alexnet_table_and_order_match_facts():
    assert ALEXNET_ERRORS == PAPER_ALEXNET
    assert list(CORRUPTIONS) == list(PAPER_ALEXNET)
    assert ALEXNET_CLEAN_ERROR == 0.4348


def test_alexnet_errors_give_exactly_100():
    errors = {c: [e] * 5 for c, e in PAPER_ALEXNET.items()}
    out = corruption_errors_to_mce(errors, clean_error=0.4348)
    assert f"{out['mce']:.3f}" == "100.000"
    assert f"{out['relative_mce']:.3f}" == "100.000"
    assert all(abs(v - 100) < 1e-9 for v in out["ce"].values())
    assert all(abs(v - 100) < 1e-9 for v in out["relative_ce"].values())


def test_hand_computed_two_corruptions_custom_baseline():
    errors = {"fog": [0.1, 0.2, 0.3, 0.4, 0.5], "snow": [0.2, 0.2, 0.2, 0.2, 0.2]}
    baseline = {"fog": 0.6, "snow": [0.4, 0.4, 0.4, 0.4, 0.4], "clean": 0.1}
    out = corruption_errors_to_mce(errors, clean_error=0.05, baseline=baseline)
    # fog: mean 0.3 / 0.6 = 50 %; snow: 0.2 / 0.4 = 50 %  -> mCE 50
    assert out["ce"]["fog"] == pytest.approx(50.0, abs=1e-12)
    assert out["ce"]["snow"] == pytest.approx(50.0, abs=1e-12)
    assert out["mce"] == pytest.approx(50.0, abs=1e-12)
    # relative: fog (0.3 - 0.05) / (0.6 - 0.1) = 50 %; snow (0.2 - 0.05) / (0.4 - 0.1) = 50 %
    assert out["relative_ce"]["fog"] == pytest.approx(50.0, abs=1e-12)
    assert out["relative_ce"]["snow"] == pytest.approx(50.0, abs=1e-12)


def test_a_corruption_where_the_baseline_errs_nowhere_is_not_scored():
    """CE = model error / baseline error: undefined where the baseline's error is 0 at every severity."""
    baseline = {"fog": [0.0, 0.0, 0.0], "snow": [0.0, 0.0, 0.3], "frost": 0.2, "contrast": 0.0}
    assert defined_corruptions(baseline) == ["snow", "frost"]
    assert defined_corruptions({}) == []


def test_hand_computed_alexnet_single_corruption():
    out = corruption_errors_to_mce({"brightness": [0.1, 0.1, 0.2, 0.2, 0.4]}, clean_error=0.08)
    assert out["ce"]["brightness"] == pytest.approx(100 * 0.2 / 0.564592, rel=1e-12)
    assert out["relative_mce"] == pytest.approx(100 * (0.2 - 0.08) / (0.564592 - 0.4348), rel=1e-12)
    assert "relative_ce" not in corruption_errors_to_mce({"brightness": [0.2] * 5})


def test_mce_is_the_mean_over_corruptions_of_the_mean_over_severities():
    """Unequal errors everywhere, so a median or a max (over severities or corruptions) gives another number."""
    errors = {"fog": [0.1, 0.1, 0.1, 0.5, 0.9], "snow": [0.3] * 5, "frost": [0.0, 0.0, 0.2, 0.2, 0.8]}
    baseline = {"fog": 0.5, "snow": 0.5, "frost": 0.5, "clean": 0.1}
    out = corruption_errors_to_mce(errors, clean_error=0.05, baseline=baseline)
    means = {"fog": 1.7 / 5, "snow": 0.3, "frost": 1.2 / 5}  # 0.34, 0.30, 0.24
    for c, m in means.items():
        assert out["ce"][c] == pytest.approx(100 * m / 0.5, rel=1e-12)
        assert out["relative_ce"][c] == pytest.approx(100 * (m - 0.05) / 0.4, rel=1e-12)
    assert out["mce"] == pytest.approx(100 * (0.34 + 0.30 + 0.24) / 3 / 0.5, rel=1e-12)  # 58.67, median 60, max 68
    assert out["relative_mce"] == pytest.approx(100 * ((0.34 + 0.30 + 0.24) / 3 - 0.05) / 0.4, rel=1e-12)


def test_metric_errors_are_one_line_value_errors():
    with pytest.raises(ValueError, match="speckle_noise"):
        corruption_errors_to_mce({"speckle_noise": [0.1] * 5})
    with pytest.raises(ValueError, match="errors.fog"):
        corruption_errors_to_mce({"fog": [10.0] * 5})
    with pytest.raises(ValueError, match="clean"):
        corruption_errors_to_mce({"fog": [0.1] * 5}, clean_error=0.1, baseline={"fog": 0.5})
    with pytest.raises(ValueError, match="baseline"):
        corruption_errors_to_mce({"fog": [0.1] * 5}, baseline="resnet")


def _knn_brute(train_x, train_y, query_x, num_classes, k, t):
    train = train_x.astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(query_x), num_classes))
    for i, q in enumerate(query_x.astype(np.float64)):
        q = q / np.linalg.norm(q)
        sims = train @ q
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, train_y[j]] += math.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_scores_match_float64_brute_force(k):
    g = torch.Generator().manual_seed(0)
    tx, qx = torch.randn(120, 16, generator=g), torch.randn(33, 16, generator=g)
    ty = torch.randint(0, 7, (120,), generator=g)
    got = knn_scores(tx, ty, qx, num_classes=7, k=k, temperature=0.07, chunk=10).double().numpy()
    want = _knn_brute(tx.numpy(), ty.numpy(), qx.numpy(), 7, min(k, 120), 0.07)
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_knn_rejects_bad_settings():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="knn.temperature"):
        knn_scores(x, y, x, num_classes=2, temperature=0)
    with pytest.raises(ValueError, match="knn.k"):
        knn_scores(x, y, x, num_classes=2, k=0)
