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


def load_cifar(root: str | Path, name: str, split: str) -> CifarSplit:
    """The `train` or `test` split of `cifar10` / `cifar100` (fine labels) under `root`."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be train or test, got {split!r}")
    directory = archive_dir(root, name)
    _, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
    images, labels = [], []
    for file in [*(train_files if split == "train" else test_files), meta_file]:
        if not (directory / file).is_file():
            raise ValueError(f"data.root: incomplete {name} archive: {directory / file} is missing")
    for file in train_files if split == "train" else test_files:
        batch = load_pickle(directory / file)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"data.root: {directory / file} lacks 'data' or '{label_key}'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"data.root: {directory / file}: 'data' has shape {data.shape}, expected [N, 3072]")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes R, G, B -> HWC
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = load_pickle(directory / meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    out = CifarSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)
    if out.labels.min() < 0 or out.labels.max() >= len(classes):
        raise ValueError(f"data.root: {directory}: labels outside 0..{len(classes) - 1}")
    return out


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
