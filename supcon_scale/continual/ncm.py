"""The nearest-class-mean classifier of SCR: class means of L2-normalised embeddings, the nearest mean wins.

As the authors' `agents/base.py` evaluate: every embedding is normalised, each class mean is the mean of its
normalised memory embeddings, normalised again, and a test embedding takes the class of the mean at the smallest
Euclidean distance. A seen class with no sample left in memory has no mean and is never predicted (the authors
draw a random mean for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the sum of the normalised embeddings [C, D] and their count [C] (summable over ranks)."""
    z = F.normalize(features.double(), dim=1)
    sums = z.new_zeros((num_classes, z.shape[1])).index_add_(0, labels, z)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums, counts


class NearestClassMean:
    """`predict(features)` -> the class ids of the nearest normalised class means."""

    def __init__(self, sums: torch.Tensor, counts: torch.Tensor):
        present = torch.nonzero(counts > 0).squeeze(1)
        if present.numel() == 0:
            raise ValueError("nearest-class-mean: the memory holds no sample of any class")
        self.classes = present
        self.means = F.normalize(sums[present] / counts[present, None], dim=1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features.to(self.means.dtype), dim=1)
        # |z - m|^2 = |z|^2 + |m|^2 - 2 z.m with unit rows: the nearest mean is the one of largest dot product
        return self.classes[torch.argmax(z @ self.means.T, dim=1)]
