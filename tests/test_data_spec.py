"""data/spec.py: the augmentation keys reach the torchvision pipeline (flip, RandAugment's n and m)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from supcon_scale.config import AugmentConfig
from supcon_scale.data.spec import spec_from_config
from supcon_scale.data.torchvision import view_transform


def _ramp() -> Image.Image:
    """A left-to-right ramp: mirrored, it is another image."""
    row = np.linspace(0, 255, 16, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(row, (16, 1))] * 3, axis=-1))


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_p_mirrors_the_view(flip_p: float):
    aug = AugmentConfig(preset="none", crop_scale=(1.0, 1.0), flip_p=flip_p)
    view = view_transform(spec_from_config(aug, 16))(_ramp())
    plain = view_transform(spec_from_config(AugmentConfig(preset="none", crop_scale=(1.0, 1.0), flip_p=0.0), 16))
    want = plain(_ramp())
    torch.testing.assert_close(view, want.flip(-1) if flip_p else want)


def test_randaugment_n_and_m_reach_the_transform():
    aug = AugmentConfig(preset="randaugment", randaugment_n=3, randaugment_m=17)
    ops = [t for t in view_transform(spec_from_config(aug, 16)).transforms if isinstance(t, v2.RandAugment)]
    assert len(ops) == 1 and (ops[0].num_ops, ops[0].magnitude) == (3, 17)
