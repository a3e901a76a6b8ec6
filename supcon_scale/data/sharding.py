"""The training split's index (with the bad-file policy) and each epoch's order, sharded by global rank.

Shared by every backend so that they all see the same files and agree on what one epoch and one position are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data import balanced
from supcon_scale.data.folder import FolderIndex
from supcon_scale.data.index import build_index, train_dir  # noqa: F401 - the scan over ranks; train_dir re-exported
from supcon_scale.data.spec import view_specs

log = logging.getLogger(__name__)


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

    The position in an epoch is global: after `k` steps the first `k * global_batch` samples of the epoch's order
    are consumed, whatever the world size. The rest is strided over the ranks of the run that continues it, so a
    checkpoint resumes on another world size (same global batch) without dropping or repeating a sample, and the
    number of steps per epoch, `ceil(N / global_batch)` or `N // global_batch`, does not depend on the world size.
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
        # ceil(ceil(N / W) / (G / W)) == ceil(N / G) when W divides G: the same on every world size.
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    @property
    def sampler(self) -> str:
        """`data.sampler` as the position records it (a position continues only the plan that saved it)."""
        return "random"

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The global shuffled order of the epoch (the same on every rank and every world size)."""
        return np.random.default_rng([seed, epoch, 0x5C]).permutation(self.num_samples)

    def _remaining(self, values: np.ndarray, start: int) -> np.ndarray:
        """`values` (one per position of the epoch's order) not yet consumed after `start` steps, padded to a
        multiple of this world size by wrapping around."""
        kept = values[: self.steps * self.global_batch] if self.drop_last else values
        rest = kept[min(start * self.global_batch, len(kept)) :]
        pad = -len(rest) % self.world_size
        return np.concatenate([rest, np.resize(values, pad)]) if pad else rest

    def _rank_batches(self, values: np.ndarray, rank: int, start: int) -> list[np.ndarray]:
        """This rank's share of `values` from step `start` on, strided by global rank, cut into its batches."""
        mine = self._remaining(values, start)[rank :: self.world_size]
        b = self.local_batch
        return [mine[i : i + b] for i in range(0, len(mine), b)]

    def remaining(self, seed: int, epoch: int, start: int = 0) -> np.ndarray:
        """The epoch's samples not yet consumed after `start` steps, padded to a multiple of this world size."""
        return self._remaining(self.order(seed, epoch), start)

    def rank_indices(self, seed: int, epoch: int, rank: int, start: int = 0) -> np.ndarray:
        """This rank's samples of the epoch from step `start` on, strided by global rank like DistributedSampler."""
        return np.concatenate(self.batches(seed, epoch, rank, start) or [np.zeros(0, np.int64)])

    def batches(self, seed: int, epoch: int, rank: int, start: int = 0) -> list[np.ndarray]:
        """This rank's batches of the epoch from batch `start` on (one step is one batch on every rank)."""
        return self._rank_batches(self.order(seed, epoch), rank, start)

    def draws(self, seed: int, epoch: int, rank: int, start: int = 0) -> list[np.ndarray] | None:
        """Per sample of `batches`, its earlier uses in the epoch, which seed its augmentation apart; None: all 0
        (the random order uses a sample once; the padding of drop_last=false keeps its first use's seed)."""
        return None


@dataclass(frozen=True)
class BalancedPlan(EpochPlan):
    """The epoch plan of `data.sampler=m_per_class` (`data/balanced.py` says what one epoch is): m images of each of
    global_batch / m classes per global batch, over samples labelled `labels`.

    Its order is `steps * global_batch` long (every batch full), so the random plan's slicing applies unchanged:
    the global position, the rank shares strided over each global batch, resume on another world size.
    """

    labels: np.ndarray = field(repr=False, compare=False)
    m: int
    _last: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # the last (seed, epoch)'s order

    def __post_init__(self) -> None:
        super().__post_init__()
        present, sizes = np.unique(np.asarray(self.labels), return_counts=True)
        balanced.check_balance(self.m, self.global_batch, dict(zip(present.tolist(), sizes.tolist(), strict=True)))

    @property
    def sampler(self) -> str:
        """`m_per_class=M`: a position saved mid-epoch continues only this plan with this m."""
        return f"m_per_class={self.m}"

    @property
    def per_rank(self) -> int:
        """Every global batch is full: no padding, the same share on every rank."""
        return self.steps * self.local_batch

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The balanced global order of the epoch (`balanced.balanced_order`), kept for the pass that asks again."""
        if (seed, epoch) not in self._last:  # batches and draws of a pass share one (~0.2 s for ImageNet)
            self._last.clear()
            self._last[seed, epoch] = balanced.balanced_order(
                seed, epoch, self.labels, self.m, self.global_batch, self.steps
            )
        return self._last[seed, epoch]

    def draws(self, seed: int, epoch: int, rank: int, start: int = 0) -> list[np.ndarray] | None:
        """Per sample of `batches`, its uses earlier in the epoch's global order (a small class repeats images)."""
        return self._rank_batches(balanced.earlier_uses(self.order(seed, epoch)), rank, start)


def epoch_plan(cfg: DataConfig, labels: list[int] | np.ndarray, world_size: int) -> EpochPlan:
    """The plan `data.sampler` asks for over samples labelled `labels` (every label is known before loading)."""
    if cfg.sampler == "m_per_class":
        return BalancedPlan(
            len(labels), cfg.global_batch_size, world_size, cfg.drop_last, np.asarray(labels), cfg.m_per_class
        )
    return EpochPlan(len(labels), cfg.global_batch_size, world_size, cfg.drop_last)


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """The augmentation seed of one sample: independent of rank, worker count and position in the batch; `draw` > 0
    for its later uses in an epoch (`EpochPlan.draws`), so a repeated image gets new views."""
    return int(np.random.SeedSequence([seed, epoch, index, *([draw] if draw else [])]).generate_state(1)[0])


def check_position(
    state: dict, *, world_size: int, backend: str, num_samples: int, steps: int, global_batch: int
) -> None:
    """Refuse a saved data position that this loader cannot continue exactly (docs/RELIABILITY.md).

    Another world size is fine (the position is global) unless the position holds a backend's own per-rank reader
    state mid-epoch (DALI's checkpoint), which cannot be split over other ranks.
    """
    saved_world = int(state["world_size"])
    if str(state["backend"]) != backend:
        raise ValueError(f"data position was saved by backend {state['backend']!r}, this run uses {backend!r}")
    if int(state["num_samples"]) != num_samples:
        raise ValueError(
            f"data position was saved over {int(state['num_samples'])} images but data.root now has {num_samples}"
        )
    saved_batch = state.get("global_batch")
    if saved_batch is not None and int(saved_batch) != global_batch:
        raise ValueError(
            f"data position was saved with data.global_batch_size={int(saved_batch)}, this run has {global_batch}; "
            "the position counts steps of that batch size"
        )
    if saved_world != world_size:
        blob = state.get("dali_checkpoint")
        mid_epoch = 0 < int(state["batch"]) < steps
        per_rank_reader = getattr(blob, "numel", lambda: 0)() > 0
        if saved_batch is None or (mid_epoch and per_rank_reader):
            why = (
                "it predates global positions"
                if saved_batch is None
                else f"backend {backend}'s reader checkpoint is per rank; resume from an epoch-end checkpoint"
            )
            raise ValueError(
                f"data position was saved with world size {saved_world} but this run has world size {world_size}; "
                f"{why} (resuming would drop or repeat samples)"
            )
    if not 0 <= int(state["batch"]) <= steps:
        raise ValueError(f"data position batch {int(state['batch'])} is outside this epoch's {steps} batches")


class EpochCursor:
    """The epoch a loader serves and how many of its batches it has handed out: the position checkpoints keep.

    A loader sets `backend`, `steps_per_epoch`, `local_batch`, `seed`, `ctx` and `num_samples`, calls
    `_begin_pass()` when an iteration starts and advances `position` per batch; `_reset()` drops its own per-pass
    state. `position` counts steps, the same on every rank: `position * global_batch` samples of the epoch's global
    order are consumed (EpochPlan), which is what lets a checkpoint continue on another world size.
    """

    epoch = 0
    position = 0
    sampler = "random"  # the plan's name in the position (EpochPlan.sampler)

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

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.ctx.world_size

    def position_state(self) -> dict[str, int | str]:
        return {
            "backend": self.backend,
            "epoch": self.epoch,
            "batch": self.position,
            "samples": self.position * self.global_batch,  # consumed of the epoch's global order (for people)
            "global_batch": self.global_batch,
            "world_size": self.ctx.world_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "sampler": self.sampler,
        }

    def load_position(self, state: dict) -> None:
        """Continue from a saved position (of any world size with the same global batch), or raise ValueError
        naming what differs."""
        check_position(
            state,
            world_size=self.ctx.world_size,
            backend=self.backend,
            num_samples=self.num_samples,
            steps=self.steps_per_epoch,
            global_batch=self.global_batch,
        )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data position was saved with seed {int(state['seed'])}, this run uses {self.seed}")
        saved = str(state.get("sampler", "random"))  # positions saved before data.sampler existed: random
        if saved != self.sampler and 0 < int(state["batch"]) < self.steps_per_epoch:
            raise ValueError(
                f"data position was saved mid-epoch with data.sampler {saved}, this run has {self.sampler}; "
                "resume from an epoch-end checkpoint to change the sampler"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["batch"])
        self._reset()


class FolderCursor(EpochCursor):
    """An EpochCursor over an image folder: the checked index, classes, AugmentSpec and per-rank epoch plan."""

    def __init__(self, cfg: DataConfig, ctx: distributed.Context, seed: int, out_dir: Path | None):
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.index, self.bad_files = build_index(cfg, ctx, out_dir)
        self.num_classes = num_classes(cfg, self.index)
        self.classes_present = len(set(self.index.labels))  # after the bad-file filter; empty folders not counted
        self.specs = view_specs(cfg)  # one per view: multi-crop views have their own size and crop scale
        self.spec = self.specs[0]
        self.plan = epoch_plan(cfg, self.index.labels, ctx.world_size)
        self.sampler = self.plan.sampler
        self.steps_per_epoch = self.plan.steps
        self.local_batch = self.plan.local_batch

    @property
    def num_samples(self) -> int:
        return len(self.index)
