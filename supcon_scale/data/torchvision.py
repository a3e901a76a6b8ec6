"""The torchvision backend: Pillow decoding and v2 transforms in DataLoader workers, the same AugmentSpec as DALI.

Each sample's augmentation is seeded from (seed, epoch, sample index) inside the dataset, so batches depend neither
on the number of workers nor on the world size, and a mid-epoch resume replays the remaining batches exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.index import Samples
from supcon_scale.data.sharding import EpochPlan, FolderCursor, sample_seed
from supcon_scale.data.spec import AugmentSpec
from supcon_scale.resilience import ignore_preemption_signals

BACKEND = "torchvision"


def view_transform(spec: AugmentSpec) -> v2.Compose:
    """One random view of a PIL RGB image as a normalised float32 tensor [3, S, S]."""
    ops: list[v2.Transform] = [
        # Crop and resize on the PIL image: Pillow's resize is the fastest step to shrink the data early.
        v2.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
        v2.PILToTensor(),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    for stage in spec.stages:
        if stage == "jitter":
            b, c, s, h = spec.jitter
            ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=spec.jitter_p))
        elif stage == "grayscale":
            ops.append(v2.RandomGrayscale(spec.grayscale_p))
        elif stage == "blur":
            ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, spec.blur_sigma)], p=spec.blur_p))
        elif stage == "randaugment":
            ops.append(
                v2.RandAugment(
                    num_ops=spec.randaugment_n, magnitude=spec.randaugment_m, num_magnitude_bins=spec.randaugment_bins
                )
            )
        elif stage == "autoaugment":
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
        else:  # pragma: no cover - PRESET_STAGES and this list are kept in step
            raise AssertionError(f"unknown stage {stage}")
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(ops)


def load_rgb(path: str) -> Image.Image:
    """Any decodable file (grayscale, CMYK, palette, a PNG named .jpg) as an RGB image."""
    with Image.open(path) as img:
        return img.convert("RGB")


class ViewsDataset(torch.utils.data.Dataset):
    """`(views, label)` for a key `(epoch, index)` or `(epoch, index, draw)`: V views of one image, seeded by (seed,
    epoch, index) and, for an image used again in the epoch (`EpochPlan.draws`), its draw.

    `spec` is every view's, or one per view (multi-crop: `spec.view_specs`, each view at its own size and scale)."""

    def __init__(self, index: Samples, spec: AugmentSpec | Sequence[AugmentSpec], views: int, seed: int):
        self.index = index
        self.views = views
        self.seed = seed
        specs = [spec] * views if isinstance(spec, AugmentSpec) else list(spec)
        assert len(specs) == views, f"{len(specs)} specs for {views} views"
        built: dict[int, v2.Compose] = {}  # one transform per distinct spec object
        self.transforms = [built.setdefault(id(s), view_transform(s)) for s in specs]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[list[torch.Tensor], int]:
        epoch, i, draw = (*key, 0)[:3]
        img = self.index.image(i)  # a file, a shard member or a CIFAR array, as RGB
        # fork_rng: with workers=0 this runs in the training process, whose RNG must not be disturbed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i, draw))
            views = [transform(img) for transform in self.transforms]
        return views, self.index.labels[i]


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler over `(epoch, index, draw)` keys; the loader sets its epoch and start batch before each pass."""

    def __init__(self, plan: EpochPlan, seed: int, rank: int):
        self.plan, self.seed, self.rank = plan, seed, rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.plan.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        batches = self.plan.batches(self.seed, self.epoch, self.rank, self.start)
        draws = self.plan.draws(self.seed, self.epoch, self.rank, self.start) or [
            np.zeros(len(b), int) for b in batches
        ]
        for batch, draw in zip(batches, draws, strict=True):
            yield [(self.epoch, int(i), int(d)) for i, d in zip(batch, draw, strict=True)]


class TorchvisionLoader(FolderCursor):
    """The data contract of docs/DESIGN.md over a DataLoader; see `supcon_scale.data.build_train_loader`."""

    backend = BACKEND

    def __init__(self, cfg: DataConfig, ctx: distributed.Context, seed: int, out_dir: Path | None):
        super().__init__(cfg, ctx, seed, out_dir)
        self._sampler = _EpochBatches(self.plan, seed, ctx.rank)
        workers = cfg.workers
        self._loader = torch.utils.data.DataLoader(
            ViewsDataset(self.index, self.specs, cfg.views, seed),
            batch_sampler=self._sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=ctx.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_preemption_signals,
        )

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._begin_pass()
        self._sampler.epoch, self._sampler.start = self.epoch, self.position
        cuda = self.ctx.device.type == "cuda"
        for views, labels in self._loader:
            views = [v.to(self.ctx.device, non_blocking=True) for v in views]
            if cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            self.position += 1
            yield views, labels.to(self.ctx.device, dtype=torch.int64, non_blocking=True)

    def state_dict(self) -> dict[str, int | str]:
        return self.position_state()

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)

    def sample_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch` in the order they are served (for tests and diagnostics)."""
        return self.plan.rank_indices(self.seed, epoch, self.ctx.rank)
