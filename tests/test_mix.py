"""Per-view Mixup/CutMix (GenSCL): label vectors sum to 1, lambda ~ Beta(alpha, alpha), CutMix weight = pasted area."""

import numpy as np
import pytest
import torch
from scipy import stats

from supcon_scale.config import MixConfig
from supcon_scale.objectives.mix import ViewMixer


def _batch(b: int = 8, size: int = 16):
    # every image is constant, equal to its index: a pixel tells which sample it came from
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, size, size).contiguous()
    return x, torch.arange(b) % 4


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_label_vectors_are_distributions(mixup: float, cutmix: float):
    mixer = ViewMixer(MixConfig(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0), num_classes=4, seed=0)
    x, y = _batch()
    views, vectors = mixer([x, x.clone()], y)
    assert vectors.shape == (8, 2, 4) and len(views) == 2
    torch.testing.assert_close(vectors.sum(-1), torch.ones(8, 2))
    assert (vectors >= 0).all()


def test_views_are_mixed_independently():
    mixer = ViewMixer(MixConfig(mixup_alpha=1.0, prob=1.0), num_classes=4, seed=1)
    x, y = _batch()
    (a, b), _ = mixer([x, x.clone()], y)
    assert not torch.equal(a, b)  # own permutation and lambda per view


def test_mixup_lambda_follows_beta():
    alpha = 0.4
    mixer = ViewMixer(MixConfig(mixup_alpha=alpha, prob=1.0), num_classes=4, seed=2)
    x, y = _batch(4, 4)
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    lams = np.array([mixer.mix_view(x, one_hot)[2] for _ in range(1500)])
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_mixup_images_match_their_label_vectors():
    mixer = ViewMixer(MixConfig(mixup_alpha=1.0, prob=1.0), num_classes=8, seed=4)
    x, _ = _batch(8, 4)
    mixed, vec, lam, kind = mixer.mix_view(x, torch.eye(8))  # label i for image i (value i)
    assert kind == "mixup"
    for i in range(8):
        # the pixel value is sum_j vec[i, j] * j: the image is the mixture its label vector describes
        assert mixed[i, 0, 0, 0].item() == pytest.approx((vec[i] * torch.arange(8.0)).sum().item(), abs=1e-5)
        assert vec[i].max().item() >= min(lam, 1 - lam) - 1e-6


def test_cutmix_weight_equals_pasted_area():
    mixer = ViewMixer(MixConfig(cutmix_alpha=1.0, prob=1.0), num_classes=8, seed=3)
    x, _ = _batch(8, 20)
    y = torch.arange(8)
    one_hot = torch.nn.functional.one_hot(y, 8).float()
    checked = 0
    for _ in range(50):
        mixed, vec, _lam, kind = mixer.mix_view(x, one_hot)
        assert kind == "cutmix"
        for i in range(8):
            pasted = (mixed[i, 0] != i).float().mean().item()
            if pasted > 0:  # the partner differs from i: the label keeps exactly the unpasted share
                assert vec[i, i].item() == pytest.approx(1 - pasted, abs=1e-6)
                assert vec[i].sum().item() == pytest.approx(1.0)
                checked += 1
    assert checked > 100


def test_prob_zero_leaves_batch_alone():
    mixer = ViewMixer(MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0), num_classes=4, seed=0)
    x, y = _batch()
    (v,), vectors = mixer([x], y)
    assert torch.equal(v, x)
    torch.testing.assert_close(vectors[:, 0], torch.nn.functional.one_hot(y, 4).float())


@pytest.mark.parametrize("switch_prob,kind", [(0.0, "mixup"), (1.0, "cutmix")])
def test_switch_prob_chooses_between_mixup_and_cutmix(switch_prob: float, kind: str):
    """mix.switch_prob is the chance of CutMix when both alphas are set: 0 always Mixup, 1 always CutMix."""
    mixer = ViewMixer(MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, switch_prob=switch_prob), 4, seed=0)
    x, y = torch.rand(8, 3, 16, 16), torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    kinds = {mixer.mix_view(x, y)[3] for _ in range(20)}
    assert kinds == {kind}
