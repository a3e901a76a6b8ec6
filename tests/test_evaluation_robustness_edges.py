"""ImageNet-C's geometry and the evaluation's normalisation against independent references (issue 28, item 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from supcon_scale.evaluation.c_dataset import _prepare
from supcon_scale.evaluation.robustness import evaluate_c


def _ramp(w: int, h: int, axis: int) -> Image.Image:
    """A float image whose value is its x (axis 1) or y (axis 0) pixel index: a resample reads back its source."""
    return Image.fromarray(np.indices((h, w), dtype=np.float32)[axis], mode="F")


@pytest.mark.parametrize("axis", [0, 1])
def test_imagenet_c_crop_by_hand_at_500x353(axis):
    """torchvision's Resize(256) + CenterCrop(224), as make_imagenet_c.py, on a 500x353 photo, worked by hand.

    Short side 353 -> 256, long side int(256 * 500 / 353) = int(362.6) = 362; crop offsets round((362 - 224) / 2) =
    69 and round((256 - 224) / 2) = 16. Output pixel (i, j) reads source x = (69 + j + 1/2) * 500/362 - 1/2 (y
    alike), exact for a ramp (a symmetric filter keeps a linear function away from the border).
    """
    out = np.asarray(_prepare(_ramp(500, 353, axis), 224), dtype=np.float64)
    assert out.shape == (224, 224)
    idx = np.arange(224)
    if axis == 1:
        want = (69 + idx + 0.5) * 500 / 362 - 0.5
        got = out[112]
    else:
        want = (16 + idx + 0.5) * 353 / 256 - 0.5
        got = out[:, 112]
    inner = slice(2, -2)  # the filter is clipped at the image border, not inside it
    assert np.abs(got[inner] - want[inner]).max() < 0.1  # PIL's fixed-point weights: ~0.05 px


@pytest.mark.parametrize(("w", "h", "size"), [(500, 353, 224), (353, 500, 224), (640, 427, 224), (45, 37, 32)])
def test_imagenet_c_geometry_is_the_reference_transform(w, h, size):
    """The same pixels as ImageNet-C's own `trn.Resize(size / 0.875)` + `trn.CenterCrop(size)` (torchvision v1)."""
    from torchvision import transforms as trn

    for axis in (0, 1):
        image = _ramp(w, h, axis)
        reference = trn.Compose([trn.Resize(round(size / 0.875)), trn.CenterCrop(size)])(image)
        assert np.array_equal(np.asarray(_prepare(image, size)), np.asarray(reference))


class _Inputs(torch.nn.Module):
    """Logits of two classes; keeps every input it was given (the evaluation's view, normalised)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 2)


COLOUR = (200, 100, 50)


def _c_root(root: Path, size: int) -> Path:
    for label in ("a", "b"):
        folder = root / "fog" / "1" / label
        folder.mkdir(parents=True)
        Image.new("RGB", (size + 3, size + 1), COLOUR).save(folder / "x.png")
    return root


@pytest.mark.parametrize("resize", [False, True])
def test_corrupted_images_are_normalised_with_the_runs_mean_and_std(tmp_path, resize):
    """(pixel / 255 - mean) / std with the mean/std given (the run's), not ImageNet's, on both ImageNet-C views."""
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    model = _Inputs()
    evaluate_c(
        model,
        _c_root(tmp_path, 8),
        image_size=8,
        corruptions=["fog"],
        severities=[1],
        resize=resize,
        mean=mean,
        std=std,
    )
    x = torch.cat(model.seen)
    want = (torch.tensor(COLOUR, dtype=torch.float64) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x.double(), want[None, :, None, None].expand_as(x), atol=1e-5)
