"""Class-incremental streams: a dataset's classes split into T tasks of disjoint classes, seen one task after another.

Online (`stream.epochs: 1`) each task's training samples pass once, in small incoming batches; offline several
epochs per task. Every rank computes the same global schedule from the seed: step k is (task, epoch, batch) and
its incoming global batch is a fixed list of sample ids, of which rank r takes the r-th contiguous share.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from supcon_scale.config import ConfigError, DataConfig
from supcon_scale.continual.config import ContinualConfig
from supcon_scale.distributed import Context


class ImageSource(Protocol):
    """A labelled image set: `labels[i]`, `classes[label]`, the image and its encoded bytes (what memory stores)."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int: ...

    def image(self, i: int) -> Image.Image: ...

    def encoded(self, i: int) -> bytes: ...


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes (JPEG, PNG, ...) as an RGB image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class SampleSource:
    """A split of `data.format` as the training loaders read it (folder, shards, CIFAR); the memory keeps each
    sample's encoded bytes: the file as stored for folders and shards, a lossless PNG of CIFAR's pixel arrays."""

    def __init__(self, samples: Any):
        self.samples = samples
        self.labels = np.asarray(samples.labels, dtype=np.int64)
        self.classes = list(samples.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> bytes:
        data = self.samples.encoded(i)
        if not self.samples.raw:
            return data.tobytes()
        buf = io.BytesIO()
        Image.fromarray(data).save(buf, format="PNG")
        return buf.getvalue()

    def image(self, i: int) -> Image.Image:
        return self.samples.image(i)


class ArraySource:
    """Images held as a uint8 array [N, H, W, 3]; the memory keeps each one PNG-encoded (lossless)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.images[i]).save(buf, format="PNG")
        return buf.getvalue()

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


def load_sources(cfg: ContinualConfig, ctx: Context) -> tuple[SampleSource, SampleSource]:
    """(train, test) of `data.root`: ROOT/train and ROOT/val (folder, shards), or the CIFAR archive's two splits.

    Folders and shards go through the training loaders' start-up scan: undecodable samples are skipped and listed
    (`data.on_bad_file: skip`) or stop the run (`fail`), with the scan's manifest in OUT_DIR/data/<split>.
    """
    root = Path(cfg.data.root)
    if cfg.data.format == "cifar":
        from supcon_scale.data.cifar import cifar_index

        return SampleSource(cifar_index(root, "train")), SampleSource(cifar_index(root, "test"))
    from supcon_scale.data.index import build_index

    splits = []
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"data.root: {root} has no {split}/ split (continual runs need train/ and val/)")
        data = DataConfig(root=str(root / split), format=cfg.data.format, on_bad_file=cfg.data.on_bad_file)
        samples, _ = build_index(data, ctx, Path(cfg.out_dir) / "data" / split)
        splits.append(SampleSource(samples))
    train, test = splits
    if train.classes != test.classes:
        raise ValueError(f"data.root: {root}/train and {root}/val hold different classes")
    return train, test


def class_order(cfg: ContinualConfig, classes: list[str], seed: int) -> list[int]:
    """Class ids in the order the stream introduces them: `stream.class_order`, else a per-seed permutation."""
    given = cfg.stream.class_order
    if given is None:
        ids = np.arange(len(classes))
        return [
            int(c)
            for c in (np.random.default_rng([seed, 0xC1A55]).permutation(ids) if cfg.stream.shuffle_classes else ids)
        ]
    by_name = {name: i for i, name in enumerate(classes)}
    order, unknown = [], []
    for c in given:
        if isinstance(c, str) and c in by_name:
            order.append(by_name[c])
        elif isinstance(c, int) and 0 <= c < len(classes):
            order.append(c)
        else:
            unknown.append(repr(c))
    if unknown:
        shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
        raise ConfigError(f"stream.class_order names unknown classes {', '.join(unknown)} (the dataset has: {shown})")
    if len(set(order)) != len(order):
        raise ConfigError(f"stream.class_order names a class twice (by name and by index?): {given}")
    return order


@dataclass(frozen=True)
class ClassIncrementalStream:
    """The global schedule of one run: which classes each task has and which samples each step brings."""

    tasks: list[list[int]]  # class ids per task
    train_ids: list[np.ndarray]  # per task: its training sample ids (sorted)
    test_ids: list[np.ndarray]  # per task: its test sample ids (sorted)
    batch_size: int
    epochs: int
    seed: int

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def steps_per_epoch(self, task: int) -> int:
        """Full incoming batches of `task` per epoch (the last partial batch is dropped, as the authors' loader)."""
        return len(self.train_ids[task]) // self.batch_size

    def schedule(self) -> list[tuple[int, int, int]]:
        """(task, epoch, batch) of every step of the run, in order."""
        return [
            (t, e, b) for t in range(self.num_tasks) for e in range(self.epochs) for b in range(self.steps_per_epoch(t))
        ]

    def batch(self, task: int, epoch: int, index: int) -> np.ndarray:
        """The global incoming batch: sample ids of `task`, shuffled per (seed, task, epoch)."""
        order = np.random.default_rng([self.seed, task, epoch]).permutation(self.train_ids[task])
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def streamed_samples(self) -> int:
        """Distinct samples the memory sees: every full batch of each task's first epoch."""
        return sum(self.steps_per_epoch(t) * self.batch_size for t in range(self.num_tasks))


def build_stream(cfg: ContinualConfig, train: ImageSource, test: ImageSource, seed: int) -> ClassIncrementalStream:
    """Split the classes into `stream.tasks` tasks (sizes differ by at most one) and check the run is possible."""
    order = class_order(cfg, train.classes, seed)
    t = cfg.stream.tasks
    if t > len(order):
        raise ConfigError(
            f"stream.tasks={t} leaves {t - len(order)} task(s) without classes: the class order has {len(order)} "
            "classes"
        )
    tasks = [[int(c) for c in part] for part in np.array_split(np.asarray(order), t)]
    train_ids = [np.flatnonzero(np.isin(train.labels, task)) for task in tasks]
    test_ids = [np.flatnonzero(np.isin(test.labels, task)) for task in tasks]
    for i, ids in enumerate(train_ids):
        if len(ids) < cfg.stream.batch_size:
            names = ", ".join(train.classes[c] for c in tasks[i])
            raise ConfigError(
                f"stream.batch_size={cfg.stream.batch_size} is larger than task {i}'s {len(ids)} training samples "
                f"(classes {names})"
            )
    for i, ids in enumerate(test_ids):
        if len(ids) == 0:
            names = ", ".join(test.classes[c] for c in tasks[i])
            raise ValueError(f"data.root: task {i} (classes {names}) has no test images to score it on")
    stream = ClassIncrementalStream(tasks, train_ids, test_ids, cfg.stream.batch_size, cfg.stream.epochs, seed)
    if cfg.memory.size > stream.streamed_samples():
        raise ConfigError(
            f"memory.size={cfg.memory.size} is larger than the stream: it brings {stream.streamed_samples()} "
            f"training samples ({t} tasks, batches of {cfg.stream.batch_size})"
        )
    return stream
