"""The images a continual step trains on: augmented views seeded per sample, and the plain (test-time) view.

A sample's views depend only on (run seed, step, kind, sample id), never on its rank or position in the batch, so
a run on several ranks augments exactly as one process does and a resumed run as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from supcon_scale.config import AugmentConfig
from supcon_scale.data.spec import spec_from_config
from supcon_scale.data.torchvision import view_transform

INCOMING, MEMORY = 0, 1  # the `kind` of a sample: from the incoming batch or drawn from memory


def plain_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize (short side) and centre-crop to `image_size`, then normalise: the test-time view, no randomness."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def augment_transform(image_size: int, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One random view from the project's AugmentSpec (random-resized-crop, flip, jitter, grayscale, ...)."""
    aug = dataclasses.replace(aug, mean=tuple(mean), std=tuple(std))
    return view_transform(spec_from_config(aug, image_size))


def sample_seed(seed: int, step: int, kind: int, sample: int) -> int:
    return int(np.random.SeedSequence([seed, step, kind, sample]).generate_state(1)[0])


def seeded_views(
    images: Sequence[Image.Image],
    seeds: Sequence[int],
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
) -> list[torch.Tensor]:
    """One batch [N, 3, S, S] per transform; sample n's views come from `seeds[n]` (the caller's RNG is untouched)."""
    out: list[list[torch.Tensor]] = [[] for _ in transforms]
    with torch.random.fork_rng(devices=[]):
        for img, s in zip(images, seeds, strict=True):
            torch.manual_seed(s)
            for k, t in enumerate(transforms):
                out[k].append(t(img))
    return [torch.stack(v) for v in out]
