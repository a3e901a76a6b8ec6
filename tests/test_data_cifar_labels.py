"""CIFAR-10/100 labels, class names and pixels against the archive's own fields (issue 28, item 5).

Tiny archives are written here in the official format (protocol-2 pickles of dicts with bytes keys, `data` as
[N, 3072] uint8 planes R, G, B), with CIFAR-100's fine and coarse labels differing on every image.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from supcon_scale.data.cifar import cifar_index, load_cifar


def _dump(path: Path, fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in fields.items()}, protocol=2))


def _batch(rng: np.random.Generator, n: int, **labels: list[int]) -> dict:
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [b"x.png"] * n, **labels}


def write_cifar100(root: Path, n: int = 7) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    out = {}
    for split in ("train", "test"):
        fine = rng.permutation(100)[:n].tolist()
        coarse = [(f + 7) % 20 for f in fine]  # never equal to the fine label of a fine label >= 20
        out[split] = _batch(rng, n, fine_labels=fine, coarse_labels=coarse)
        _dump(folder / split, out[split])
    meta = {"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
    _dump(folder / "meta", {**meta, "coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return out


def write_cifar10(root: Path, n: int = 3) -> dict[str, list[dict]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _batch(rng, n, labels=rng.integers(0, 10, n).tolist())
        out["test" if name == "test_batch" else "train"].append(batch)
        _dump(folder / name, batch)
    _dump(folder / "batches.meta", {"label_names": [f"name{i}".encode() for i in range(10)], "num_vis": 3072})
    return out


def _hwc(data: np.ndarray) -> np.ndarray:
    """The reference layout by index: pixel (y, x) of channel c is data[c * 1024 + y * 32 + x]."""
    n = len(data)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for c in range(3):
        for y in range(32):
            out[:, y, :, c] = data[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_reads_the_fine_labels_and_names_not_the_coarse(tmp_path, split):
    fields = write_cifar100(tmp_path)[split]
    got = load_cifar(tmp_path, "cifar100", split)
    assert got.labels.tolist() == fields["fine_labels"] != fields["coarse_labels"]
    assert got.classes == [f"fine{i}" for i in range(100)]
    assert np.array_equal(got.images, _hwc(fields["data"]))
    if split == "train":
        index = cifar_index(tmp_path)
        assert (
            index.labels == fields["fine_labels"]
            and index.classes[index.labels[0]] == f"fine{fields['fine_labels'][0]}"
        )


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_reads_every_batch_in_order_with_its_labels(tmp_path, split):
    batches = write_cifar10(tmp_path)[split]
    got = load_cifar(tmp_path, "cifar10", split)
    assert got.labels.tolist() == [y for b in batches for y in b["labels"]]
    assert got.classes == [f"name{i}" for i in range(10)]
    assert np.array_equal(got.images, _hwc(np.concatenate([b["data"] for b in batches])))
