"""The training split's index (with the bad-file policy) and each epoch's order, sharded by global rank.

Shared by every backend so that they all see the same files and agree on what one epoch and one position are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.badfiles import check_paths, write_bad_files
from supcon_scale.data.folder import FolderIndex, index_folder
from supcon_scale.data.spec import spec_from_config

log = logging.getLogger(__name__)


def train_dir(root: str | Path) -> Path:
    """`root/train` when it exists (the ImageNet layout), else `root` itself holding the class folders."""
    root = Path(root)
    return root / "train" if (root / "train").is_dir() else root


def build_index(
    cfg: DataConfig, ctx: distributed.Context, out_dir: Path | None, workers: int | None = None
) -> tuple[FolderIndex, int]:
    """The good files of the training split and the number skipped, after applying `data.on_bad_file`.

    Rank 0 decodes every file once and broadcasts the bad ones, so every rank applies the same policy (a failure
    stops every rank before training, naming the first bad path).
    """
    index = index_folder(train_dir(cfg.root))
    bad: list[tuple[str, str]] = []
    if ctx.is_main:
        report = check_paths(index.paths, workers)
        bad = report.bad
        if bad and cfg.on_bad_file == "skip" and out_dir is not None:
            write_bad_files(report, Path(out_dir))
    bad = distributed.broadcast_object(bad)  # type: ignore[assignment]
    if not bad:
        return index, 0
    if cfg.on_bad_file == "fail":
        path, reason = bad[0]
        raise ValueError(f"data.on_bad_file=fail: {path}: {reason} ({len(bad)} bad file(s) in total)")
    if ctx.is_main:
        where = f", listed in {Path(out_dir) / 'bad_files.txt'}" if out_dir is not None else ""
        log.warning("skipping %d undecodable image(s) of %d%s", len(bad), len(index), where)
    skip = {p for p, _ in bad}
    keep = [i for i, p in enumerate(index.paths) if p not in skip]
    return FolderIndex([index.paths[i] for i in keep], [index.labels[i] for i in keep], index.classes), len(bad)


def num_classes(cfg: DataConfig, index: FolderIndex) -> int:
    """`data.num_classes` when given (must cover the folders), else the number of class folders."""
    if cfg.num_classes is None:
        return len(index.classes)
    if cfg.num_classes < len(index.classes):
        raise ValueError(f"data.num_classes={cfg.num_classes} but {cfg.root} has {len(index.classes)} class folders")
    return cfg.num_classes


@dataclass(frozen=True)
class EpochPlan:
    """How `num_samples` split into equal per-rank batches.

    drop_last=True: the epoch is the first `steps * global_batch` samples of the shuffled order (the rest, fewer than
    one global batch, wait for another epoch); every kept sample is seen exactly once. drop_last=False: the order is
    padded by wrapping around to a multiple of the world size (DistributedSampler's rule, at most world-1 repeats)
    and the last batch of each rank may be smaller, the same size on every rank.
    """

    num_samples: int
    global_batch: int
    world_size: int
    drop_last: bool

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(
                f"data.global_batch_size={self.global_batch} is not divisible by the world size {self.world_size}"
            )
        if self.drop_last and self.num_samples < self.global_batch:
            raise ValueError(
                f"data.global_batch_size={self.global_batch} exceeds the {self.num_samples} training images "
                "with data.drop_last=true (no full batch)"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def per_rank(self) -> int:
        if self.drop_last:
            return self.steps * self.local_batch
        return math.ceil(self.num_samples / self.world_size)

    @property
    def steps(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.local_batch)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The global shuffled order of the epoch (the same on every rank)."""
        return np.random.default_rng([seed, epoch, 0x5C]).permutation(self.num_samples)

    def rank_indices(self, seed: int, epoch: int, rank: int) -> np.ndarray:
        """This rank's samples for the epoch, strided by global rank like DistributedSampler."""
        order = self.order(seed, epoch)
        total = self.per_rank * self.world_size
        if total <= len(order):
            order = order[:total]
        else:
            order = np.concatenate([order, order[: total - len(order)]])
        return order[rank :: self.world_size]

    def batches(self, seed: int, epoch: int, rank: int, start: int = 0) -> list[np.ndarray]:
        """This rank's batches of the epoch from batch `start` on."""
        idx = self.rank_indices(seed, epoch, rank)
        b = self.local_batch
        return [idx[i : i + b] for i in range(start * b, len(idx), b)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: independent of rank, worker count and position in the batch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def check_position(state: dict, *, world_size: int, backend: str, num_samples: int, steps: int) -> None:
    """Refuse a saved data position that this loader cannot continue exactly (as DALI's and torchdata's checkpoints do; docs/RELIABILITY.md)."""
    if int(state["world_size"]) != world_size:
        raise ValueError(
            f"data position was saved with world size {int(state['world_size'])} but this run has world size "
            f"{world_size}; resuming would drop or repeat samples"
        )
    if str(state["backend"]) != backend:
        raise ValueError(f"data position was saved by backend {state['backend']!r}, this run uses {backend!r}")
    if int(state["num_samples"]) != num_samples:
        raise ValueError(
            f"data position was saved over {int(state['num_samples'])} images but data.root now has {num_samples}"
        )
    if not 0 <= int(state["batch"]) <= steps:
        raise ValueError(f"data position batch {int(state['batch'])} is outside this epoch's {steps} batches")


class EpochCursor:
    """The epoch a loader serves and how many of its batches it has handed out: the position checkpoints keep.

    A loader sets `backend`, `steps_per_epoch`, `seed`, `ctx` and `num_samples`, calls `_begin_pass()` when an
    iteration starts and advances `position` per batch; `_reset()` drops its own per-pass state.
    """

    epoch = 0
    position = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; a position restored for this same epoch is kept, any other starts at 0."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._reset()

    def _reset(self) -> None:
        """Forget per-pass state (an open iterator, a restored checkpoint); nothing by default."""

    def __len__(self) -> int:
        return self.steps_per_epoch - self.position

    def _begin_pass(self) -> None:
        if self.position >= self.steps_per_epoch:  # a finished epoch iterated again starts over
            self.position = 0
            self._reset()

    def position_state(self) -> dict[str, int | str]:
        return {
            "backend": self.backend,
            "epoch": self.epoch,
            "batch": self.position,
            "world_size": self.ctx.world_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_position(self, state: dict) -> None:
        """Continue from a saved position, or raise ValueError naming what differs."""
        check_position(
            state, world_size=self.ctx.world_size, backend=self.backend, num_samples=self.num_samples,
            steps=self.steps_per_epoch,
        )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data position was saved with seed {int(state['seed'])}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["batch"])
        self._reset()


class FolderCursor(EpochCursor):
    """An EpochCursor over an image folder: the checked index, classes, AugmentSpec and per-rank epoch plan."""

    def __init__(self, cfg: DataConfig, ctx: distributed.Context, seed: int, out_dir: Path | None):
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.index, self.bad_files = build_index(cfg, ctx, out_dir)
        self.num_classes = num_classes(cfg, self.index)
        self.spec = spec_from_config(cfg.augment, cfg.image_size)
        self.plan = EpochPlan(len(self.index), cfg.global_batch_size, ctx.world_size, cfg.drop_last)
        self.steps_per_epoch = self.plan.steps
        self.local_batch = self.plan.local_batch

    @property
    def num_samples(self) -> int:
        return len(self.index)
