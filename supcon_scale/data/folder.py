"""The ImageNet folder layout (`ROOT/<split>/<class>/<image>`): indexing, a plain dataset, and the bundled demo data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderIndex:
    """Sorted file paths with integer labels; `classes[label]` is the folder name."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def index_folder(directory: str | Path) -> FolderIndex:
    """List `directory/<class>/<image>` in a fixed order; raises ValueError naming the directory if unusable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"data.root: directory not found: {directory}")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"data.root: no class folders in {directory}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((directory / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(label)
    if not paths:
        raise ValueError(f"data.root: no images under {directory}")
    return FolderIndex(paths, labels, classes)


def make_demo_data(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled handwritten digits (8x8 grey) as RGB JPEGs upscaled to `size`.

    A fixed stratified split: `out/train/<digit>/*.jpg` and `out/val/<digit>/*.jpg`. Returns `out`.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=digits.target, random_state=seed)
    out = Path(out)
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in sorted(ids):
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(folder / f"{i:04d}.jpg", quality=95)
    return out
