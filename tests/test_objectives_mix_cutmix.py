"""CutMix's pasted area against its formula (issue 28, item 5): the label weight is the area actually pasted,
and its mean is E[(s - s^2/4)^2] for a box of side fraction s = sqrt(1 - lambda) centred uniformly and clipped."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from supcon_scale.config import MixConfig
from supcon_scale.objectives.mix import ViewMixer

SIDE, BATCH, DRAWS = 96, 4, 400


def _expected_pasted_area(alpha: float, n: int = 1_000_000) -> float:
    """Float64 reference: one side of a box of fraction s centred uniformly in [0, 1] keeps s - s^2/4 in expectation
    (s^2/8 overhangs each end), the two sides independently."""
    lam = np.random.default_rng(0).beta(alpha, alpha, n)
    s = np.sqrt(1 - lam)
    return float(((s - s * s / 4) ** 2).mean())


def test_cutmix_pastes_one_minus_lambda_of_the_image():
    mixer = ViewMixer(MixConfig(cutmix_alpha=1.0), num_classes=BATCH, seed=0)
    x = torch.arange(BATCH, dtype=torch.float32)[:, None, None, None].expand(BATCH, 1, SIDE, SIDE)  # image i is all i
    y = F.one_hot(torch.arange(BATCH), BATCH).float()
    pasted = []
    for _ in range(DRAWS):
        mixed, labels, lam, kind = mixer.mix_view(x, y)
        assert kind == "cutmix"
        for i in range(BATCH):
            other = (mixed[i] != i).float().mean().item()  # the fraction pasted from a partner, read from the pixels
            if other > 0:
                assert abs(labels[i, i].item() - (1 - other)) < 1e-6 and abs(lam - (1 - other)) < 1e-6
        pasted.append(1 - lam)
    pasted = np.array(pasted)
    want = _expected_pasted_area(1.0)
    assert abs(pasted.mean() - want) < 4 * pasted.std() / np.sqrt(DRAWS) + 2 / SIDE, (pasted.mean(), want)
