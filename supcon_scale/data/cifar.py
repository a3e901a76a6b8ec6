"""CIFAR-10/100 from the official python archives (`cifar-10-batches-py`, `cifar-100-python`), read without download.

The archives are pickles of dicts of numpy arrays and lists. They are read with a restricted unpickler that resolves
only numpy's array-reconstruction globals, so a tampered file cannot run code (plain `pickle.load` would).
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# (module, name) pairs a CIFAR archive may reference. Python 2 wrote `numpy.core.multiarray`; numpy 2 writes
# `numpy._core.multiarray`; protocol-2 pickles written by Python 3 encode raw bytes through `_codecs.encode`.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _reconstruct() -> Any:
    core = getattr(np, "_core", None)
    multiarray = core.multiarray if core is not None else np.core.multiarray
    return multiarray._reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy's ndarray/dtype reconstruction (and `_codecs.encode`); any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR archive")
        if name == "_reconstruct":
            return _reconstruct()
        if name == "encode":
            return codecs.encode
        return getattr(np, name)


def load_pickle(path: str | Path) -> dict[str, Any]:
    """One archive file as a dict with str keys (the archives' keys are bytes); ValueError if unreadable or unsafe."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"data.root: {path} is not a CIFAR python archive ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"data.root: {path} is not a CIFAR python archive (a {type(raw).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


@dataclass(frozen=True)
class CifarSplit:
    """`images` [N, 32, 32, 3] uint8 (HWC, RGB), `labels` [N] int64, `classes[label]` the class name."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# name -> (directory, train files, test files, label key, meta file, names key)
LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def archive_dir(root: str | Path, name: str) -> Path:
    """`root` itself when it holds the archive's files, else `root/<the archive's directory>`."""
    if name not in LAYOUTS:
        raise ValueError(f"data.format: unknown CIFAR archive {name!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(root)
    directory, train_files, *_ = LAYOUTS[name]
    for candidate in (root, root / directory):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise ValueError(
        f"data.root: no {name} python archive at {root} (expected {root / directory / train_files[0]}; "
        f"extract the official {directory} tarball there, nothing is downloaded)"
    )


def _class_names(path: Path, meta: dict[str, Any], names_key: str) -> list[str]:
    names = meta.get(names_key)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"data.root: {path}: '{names_key}' is missing or not a list of class names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def _pixels(path: Path, data: Any) -> np.ndarray:
    """A batch's 'data' as [N, 32, 32, 3] uint8, checked, never cast: float pixels in [0, 1] would become zeros
    and int64 values past 255 would wrap."""
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iu":
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"data.root: {path}: 'data' holds {kind}, expected uint8 pixels 0..255")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"data.root: {path}: 'data' has shape {data.shape}, expected [N, 3072]")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"data.root: {path}: 'data' ({data.dtype}) holds values outside 0..255")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> HWC


def _labels(path: Path, raw: Any, key: str, count: int, classes: int) -> np.ndarray:
    """A batch's labels as [N] int64, checked: one integer per image, each naming a class of the meta file."""
    labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if labels is None or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"data.root: {path}: '{key}' is not a list of integer labels")
    if labels.ndim != 1:
        raise ValueError(f"data.root: {path}: '{key}' has shape {labels.shape}, expected [N]")
    if len(labels) != count:
        raise ValueError(f"data.root: {path}: '{key}' holds {len(labels)} labels for {count} images")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"data.root: {path}: '{key}' holds labels outside 0..{classes - 1}")
    return labels.astype(np.int64)


def load_cifar(root: str | Path, name: str, split: str) -> CifarSplit:
    """The `train` or `test` split of `cifar10` / `cifar100` (fine labels) under `root`, every array checked by
    shape, dtype and range (a one-line ValueError naming the archive file and the field)."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be train or test, got {split!r}")
    directory = archive_dir(root, name)
    _, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
    images, labels = [], []
    for file in [*(train_files if split == "train" else test_files), meta_file]:
        if not (directory / file).is_file():
            raise ValueError(f"data.root: incomplete {name} archive: {directory / file} is missing")
    classes = _class_names(directory / meta_file, load_pickle(directory / meta_file), names_key)
    for file in train_files if split == "train" else test_files:
        batch = load_pickle(directory / file)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"data.root: {directory / file} lacks 'data' or '{label_key}'")
        images.append(_pixels(directory / file, batch["data"]))
        labels.append(_labels(directory / file, batch[label_key], label_key, len(images[-1]), len(classes)))
    return CifarSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def detect(root: str | Path) -> str:
    """`cifar10` or `cifar100`: the one archive found at `root`; ValueError when there is none or both."""
    found = []
    for name in LAYOUTS:
        try:
            archive_dir(root, name)
            found.append(name)
        except ValueError:
            pass
    if len(found) != 1:
        what = "both a CIFAR-10 and a CIFAR-100 archive" if found else "no CIFAR python archive"
        dirs = " or ".join(f"{Path(root) / LAYOUTS[n][0]}" for n in LAYOUTS)
        raise ValueError(f"data.root: {root} holds {what} (expected one of {dirs}; nothing is downloaded)")
    return found[0]


@dataclass
class CifarIndex:
    """The samples of `data.format=cifar`: raw HWC uint8 images (nothing to decode), labels, class names.

    `raw` tells the loaders the samples are pixel arrays: DALI feeds them past its decoder, torchvision wraps them
    as PIL images. `paths[i]` names the sample for messages (`archive[i]`).
    """

    images: np.ndarray
    labels: list[int]
    classes: list[str]
    paths: list[str]
    raw: ClassVar[bool] = True
    scan: object = None

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> np.ndarray:
        return self.images[i]

    def image(self, i: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.images[i], mode="RGB")

    def subset(self, keep: list[int]) -> CifarIndex:
        return CifarIndex(
            self.images[keep], [self.labels[i] for i in keep], self.classes, [self.paths[i] for i in keep]
        )


def cifar_index(root: str | Path, split: str = "train") -> CifarIndex:
    """The split of the one CIFAR archive under `root` as loader samples."""
    name = detect(root)
    data = load_cifar(root, name, split)
    where = archive_dir(root, name)
    return CifarIndex(data.images, data.labels.tolist(), data.classes, [f"{where}[{i}]" for i in range(len(data))])
