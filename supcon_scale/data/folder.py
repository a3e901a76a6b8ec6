"""The ImageNet folder layout (`ROOT/<split>/<class>/<image>`): indexing, a plain dataset, and the bundled demo data."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from supcon_scale.files import write_replacing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The largest encoded sample read (a file, or a shard's member): a 100-megapixel JPEG is about 50 MB; a larger file is
# no training image, and reading it whole could exhaust the host's memory (issue 25: a JPEG with a 12 GB tail).
MAX_SAMPLE_BYTES = 256 << 20


def too_large(size: int) -> str | None:
    """The reason a sample of `size` bytes is refused, or None."""
    if size > MAX_SAMPLE_BYTES:
        return f"{size:,} bytes, over the {MAX_SAMPLE_BYTES >> 20} MiB limit for one image"
    return None


def read_bounded(path: str) -> bytes:
    """A sample file's bytes, refusing (ValueError naming it) one over MAX_SAMPLE_BYTES before reading it."""
    with open(path, "rb") as f:
        reason = too_large(os.fstat(f.fileno()).st_size)
        if reason is not None:
            raise ValueError(f"{path}: {reason}")
        data = f.read(MAX_SAMPLE_BYTES + 1)
    if len(data) > MAX_SAMPLE_BYTES:  # it grew while we read it
        raise ValueError(f"{path}: {too_large(len(data))}")
    return data


@dataclass
class FolderIndex:
    """Sorted file paths with integer labels; `classes[label]` is the folder name.

    The samples of `data.format=folder`: `encoded(i)` is the file's bytes (what DALI decodes), `image(i)` the RGB
    image (what torchvision transforms); `sizes`/`mtimes_ns` (when listed with stats) key the scan manifest.
    """

    paths: list[str]
    labels: list[int]
    classes: list[str]
    sizes: list[int] | None = None
    mtimes_ns: list[int] | None = None
    raw: ClassVar[bool] = False  # samples are encoded files, not pixel arrays
    scan: object = field(default=None, compare=False)  # the start-up scan's ScanStats (data/index.py)

    def __len__(self) -> int:
        return len(self.paths)

    def ref(self, i: int) -> str:
        """What the bad-file scan decodes for sample `i`."""
        return self.paths[i]

    def encoded(self, i: int) -> np.ndarray:
        """The file's bytes as uint8 (DALI's decoders take them as they are)."""
        return np.frombuffer(read_bounded(self.paths[i]), dtype=np.uint8)

    def image(self, i: int) -> Image.Image:
        """Any decodable file (grayscale, CMYK, palette, a PNG named .jpg) as an RGB image."""
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB")

    def subset(self, keep: list[int]) -> FolderIndex:
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return FolderIndex(pick(self.paths), pick(self.labels), self.classes, pick(self.sizes), pick(self.mtimes_ns))


def _list_class(folder: str) -> list[tuple[str, int, int]]:
    """`(name, size, mtime_ns)` of the image files of one class folder: one directory read, one stat per file."""
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                st = entry.stat()
                out.append((entry.name, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def index_folder(directory: str | Path, workers: int = 8) -> FolderIndex:
    """List `directory/<class>/<image>` in a fixed order, with each file's size and mtime; one pass per folder.

    Folders are read by `workers` threads (directory reads and stats release the GIL, and on network storage each
    is a round trip). Raises ValueError naming the directory if it is unusable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"data.root: directory not found: {directory}")
    with os.scandir(directory) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data.root: no class folders in {directory}")
    folders = [os.path.join(directory, name) for name in classes]
    if workers > 1 and len(folders) > 1:
        with ThreadPoolExecutor(min(workers, len(folders))) as pool:
            listed = list(pool.map(_list_class, folders))
    else:
        listed = [_list_class(f) for f in folders]
    paths, labels, sizes, mtimes = [], [], [], []
    for label, (folder, files) in enumerate(zip(folders, listed, strict=True)):
        for name, size, mtime in files:
            paths.append(os.path.join(folder, name))
            labels.append(label)
            sizes.append(size)
            mtimes.append(mtime)
    if not paths:
        raise ValueError(f"data.root: no images under {directory}")
    return FolderIndex(paths, labels, classes, sizes, mtimes)


def make_demo_data(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled handwritten digits (8x8 grey) as RGB JPEGs upscaled to `size`.

    A fixed stratified split: `out/train/<digit>/*.jpg` and `out/val/<digit>/*.jpg`. Returns `out`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"make-demo-data: {out} exists and is not a directory")
    if size < 1:
        raise ValueError(f"make-demo-data: --size must be a positive number of pixels, got {size}")
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=digits.target, random_state=seed)
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in sorted(ids):
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            write_replacing(folder / f"{i:04d}.jpg", lambda tmp, img=img: img.save(tmp, format="JPEG", quality=95))
    return out
