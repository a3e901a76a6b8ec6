"""The evaluation view: no randomness, the crop the dataset's recipe names, the run's normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import v2

from supcon_scale.config import IMAGENET_MEAN, IMAGENET_STD
from supcon_scale.data.folder import FolderIndex, index_folder

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalDataset", "eval_transform"]

EvalCrop = Literal["resize_crop", "identity"]


class _Identity(torch.nn.Module):
    """The image as stored, which must already be `size` x `size` (the official eval_crop_method=IDENTITY)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"data.eval_crop=identity evaluates images as stored, but one is {x.shape[-1]}x{x.shape[-2]} and "
                f"data.image_size is {self.size}; use data.eval_crop=resize_crop"
            )
        return x


def eval_transform(
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop: EvalCrop = "resize_crop",
) -> v2.Compose:
    """`resize_crop`: the short side to size/0.875 then a centre crop (ImageNet's 256 -> 224, the official
    RESIZE_THEN_CROP with crop_padding 32 at 224); `identity`: the image as it is (CIFAR's 32 px, IDENTITY)."""
    if crop == "identity":
        geometry: list[torch.nn.Module] = [_Identity(image_size)]
    elif crop == "resize_crop":
        geometry = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"data.eval_crop: unknown crop {crop!r}; choose resize_crop or identity")
    return v2.Compose(
        [v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


class EvalDataset(torch.utils.data.Dataset):
    """`(image [3, S, S] float, label)` for every image of `root/split`, loaded as RGB."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        index: FolderIndex | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        crop: EvalCrop = "resize_crop",
    ):
        self.index = index or index_folder(Path(root) / split)
        self.transform = eval_transform(image_size, mean, std, crop)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.index.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.index.labels[i]
