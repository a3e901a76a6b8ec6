"""The evaluation view: resize, centre crop, normalise (no randomness), over the ImageNet folder layout."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from supcon_scale.config import IMAGENET_MEAN, IMAGENET_STD
from supcon_scale.data.folder import FolderIndex, index_folder

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalDataset", "eval_transform"]


def eval_transform(
    image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> v2.Compose:
    """Resize the short side to size/0.875 then centre-crop `image_size` (the standard 224/256 protocol)."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(round(image_size / 0.875), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class EvalDataset(torch.utils.data.Dataset):
    """`(image [3, S, S] float, label)` for every image of `root/split`, loaded as RGB."""

    def __init__(self, root: str | Path, split: str, image_size: int, index: FolderIndex | None = None):
        self.index = index or index_folder(Path(root) / split)
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.index.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.index.labels[i]
