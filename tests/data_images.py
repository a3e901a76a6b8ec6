"""Small image folders for the data tests, whose pixels identify the file (so tests need no loader internals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from supcon_scale.config import AugmentConfig, DataConfig

CLASSES = 4
PER_CLASS = 10
# ImageNet normalisation, to read pixels back from loader views.
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def coded_colour(label: int, item: int) -> tuple[int, int, int]:
    """The uniform colour of image `item` of class `label`: R codes the class, G the item."""
    return (20 + 50 * label, 8 + 24 * item, 128)


def decode_colour(rgb: np.ndarray) -> tuple[int, int]:
    """(label, item) from a mean RGB in 0..255 (inverse of coded_colour)."""
    return int(round((rgb[0] - 20) / 50)), int(round((rgb[1] - 8) / 24))


def write_coded(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS, size: int = 24) -> Path:
    """`root/train/c<k>/<i>.png`: uniform lossless colours, so any crop/resize/flip keeps the code exactly."""
    for k in range(classes):
        folder = root / "train" / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), coded_colour(k, i)).save(folder / f"{i:03d}.png")
    return root


def write_bad_cases(root: Path) -> tuple[list[Path], list[Path]]:
    """Add the issue's bad files and awkward-but-good files to a class folder; returns (bad, good_awkward)."""
    folder = root / "train" / "c0"
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    good = []
    p = folder / "png_named.jpg"
    photo.save(p, format="PNG")
    good.append(p)
    p = folder / "cmyk.jpg"
    photo.convert("CMYK").save(p, format="JPEG", quality=90)
    good.append(p)
    p = folder / "gray.jpg"
    photo.convert("L").save(p, format="JPEG", quality=90)
    good.append(p)
    bad = []
    p = folder / "zero.jpg"
    p.write_bytes(b"")
    bad.append(p)
    full = folder / "full_tmp.jpeg"
    photo.save(full, format="JPEG", quality=90)
    p = folder / "truncated.jpg"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    bad.append(p)
    p = folder / "notimage.jpg"
    p.write_text("this is a text file, not a JPEG\n" * 20)
    bad.append(p)
    return sorted(bad), good


GRADIENT_SIZE = 64


def write_gradients(root: Path, count: int = 48, size: int = GRADIENT_SIZE) -> Path:
    """`root/train/g<k>/<i>.png`: R = 4x+2, G = 4y+2, B = 0, so a view's pixels reveal its crop box and flip."""
    ramp = (4 * np.arange(size) + 2).clip(0, 255).astype(np.uint8)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    for i in range(count):
        folder = root / "train" / f"g{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def view_stats(views: np.ndarray, size: int = GRADIENT_SIZE) -> dict[str, float]:
    """Grayscale fraction, and over the colour views the flip fraction and mean crop area (fraction of the image).

    `views` are un-normalised RGB in 0..255, [N, 3, S, S]. Output column j samples source x = x0 + (j + 1/2) w / S,
    so columns 0 and S-1 differ by 4 w (S-1)/S in R; rows likewise in G.
    """
    s = views.shape[-1]
    gray = np.abs(views[:, 0] - views[:, 2]).max(axis=(1, 2)) < 3.0
    colour = views[~gray]
    left, right = colour[:, 0, :, 0].mean(axis=1), colour[:, 0, :, -1].mean(axis=1)
    top, bottom = colour[:, 1, 0, :].mean(axis=1), colour[:, 1, -1, :].mean(axis=1)
    w = np.abs(right - left) / 4 * s / (s - 1)
    h = np.abs(bottom - top) / 4 * s / (s - 1)
    return {
        "gray": float(gray.mean()),
        "flip": float((left > right).mean()),
        "area": float((w * h / size**2).mean()),
    }


def reference_crop_area(scale: tuple[float, float], ratio: tuple[float, float], size: int, n: int = 200_000) -> float:
    """Mean area fraction of Inception-style random-resized-crop, brute force in float64 (10 tries, then whole)."""
    rng = np.random.default_rng(0)
    area = size * size * rng.uniform(*scale, size=(n, 10))
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(n, 10)))
    w, h = np.round(np.sqrt(area * r)), np.round(np.sqrt(area / r))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    frac = np.where(ok.any(axis=1), w[rows, first] * h[rows, first] / size**2, 1.0)
    return float(frac.mean())


def coded_cfg(root: Path, **kw) -> DataConfig:
    """Whole-image crops and no colour ops, so every view keeps its file's code colour."""
    aug = AugmentConfig(preset="none", crop_scale=(1.0, 1.0))
    base = dict(root=str(root), backend="torchvision", global_batch_size=8, image_size=16, workers=0, augment=aug)
    return DataConfig(**{**base, **kw})


def identities(views: list[torch.Tensor], labels: torch.Tensor) -> list[tuple[int, int]]:
    """(label, item) of each sample, read from the pixels; checks the label and all views agree with them."""
    out = []
    for b in range(labels.shape[0]):
        codes = set()
        for v in views:
            rgb = ((v[b : b + 1] * STD + MEAN) * 255).mean(dim=(0, 2, 3)).numpy()
            codes.add(decode_colour(rgb))
        assert len(codes) == 1, codes
        code = codes.pop()
        assert code[0] == int(labels[b]), (code, int(labels[b]))
        out.append(code)
    return out


def write_noise(root: Path, classes: int, per_class: int, seed: int, size: int = 24) -> Path:
    """`root/train/c<k>/<i>.png` of random RGB noise: a flip, crop, colour or blur change shows in the pixels."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / "train" / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
