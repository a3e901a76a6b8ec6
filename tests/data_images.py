"""Small image folders for the data tests, whose pixels identify the file (so tests need no loader internals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 4
PER_CLASS = 10


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
