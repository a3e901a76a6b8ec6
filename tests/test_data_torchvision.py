"""torchvision backend: the DESIGN.md data contract, sharding, determinism and mid-epoch resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from data_images import CLASSES, PER_CLASS, decode_colour, write_coded
from multiproc import run_ranks
from supcon_scale.config import AugmentConfig, DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.data.folder import make_demo_data
from supcon_scale.distributed import Context

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> Path:
    return write_coded(tmp_path_factory.mktemp("coded"))


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


def test_views_shape_dtype_and_range(digits):
    cfg = DataConfig(root=str(digits), global_batch_size=16, image_size=24, workers=0, views=3)
    loader = build_train_loader(cfg, Context(), seed=0, out_dir=None)
    assert loader.num_classes == 10
    assert loader.steps_per_epoch == 1437 // 16
    views, labels = next(iter(loader))
    assert len(views) == 3
    for v in views:
        assert v.shape == (16, 3, 24, 24) and v.dtype == torch.float32
        pixels = v * STD + MEAN  # undo normalisation: must be back in [0, 1] and use the range
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert pixels.max() - pixels.min() > 0.5
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    for b in range(16):  # the views of one image differ (random crops, jitter, ...)
        assert not torch.allclose(views[0][b], views[1][b])
    # the normalised batch is roughly centred: a wrong mean/std would shift it by a whole unit
    assert abs(float(torch.stack(views).mean())) < 1.5


def test_labels_match_folders_and_epoch_covers_each_file_once(coded):
    loader = build_train_loader(coded_cfg(coded), Context(), seed=3, out_dir=None)
    assert loader.num_classes == CLASSES and loader.steps_per_epoch == CLASSES * PER_CLASS // 8
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = [c for views, labels in loader for c in identities(views, labels)]
        assert sorted(seen) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]
        if epoch == 0:
            first = seen
    assert seen != first  # a new order each epoch


BACKENDS = ("torchvision", "dali-cpu")


def _rank_identities(rank: int, world: int, root: str) -> dict[tuple[str, bool], list[list[tuple[int, int]]]]:
    out = {}
    for backend in BACKENDS:
        for drop_last, batch in ((True, 8), (False, 12)):
            cfg = coded_cfg(Path(root), backend=backend, global_batch_size=batch, drop_last=drop_last, dali_threads=1)
            loader = build_train_loader(cfg, Context(rank=rank, world_size=world), seed=5, out_dir=None)
            loader.set_epoch(2)
            out[backend, drop_last] = [identities(v, l) for v, l in loader]
            assert len(out[backend, drop_last]) == loader.steps_per_epoch
    return out


def test_two_ranks_see_every_file_once(coded):
    """Both backends, sharded by global rank: every file once per epoch, equal batch counts and sizes per rank."""
    results = run_ranks(_rank_identities, 2, str(coded))
    for key in results[0]:
        drop_last = key[1]
        per_rank = [r[key] for r in results]
        assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on every rank
        for b0, b1 in zip(*per_rank):
            assert len(b0) == len(b1)
        seen = [c for rank in per_rank for batch_ in rank for c in batch_]
        assert sorted(seen) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]
        if not drop_last:
            assert [len(b) for b in per_rank[0]] == [6, 6, 6, 2]


def test_same_seed_same_batches_whatever_the_workers(digits):
    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        cfg = DataConfig(root=str(digits), global_batch_size=8, image_size=16, workers=workers)
        loader = build_train_loader(cfg, Context(), seed=seed, out_dir=None)
        loader.set_epoch(1)
        out = []
        for views, labels in loader:
            out.append(torch.cat([torch.stack(views).flatten(), labels.float()]))
            if len(out) == 3:
                break
        return out

    a, b, c = batches(7, 0), batches(7, 2), batches(8, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_resume_mid_epoch_yields_the_remaining_batches(coded):
    cfg = coded_cfg(coded, augment=AugmentConfig(preset="simclr"), workers=2)
    full = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    full.set_epoch(4)
    reference = [(torch.stack(v), l) for v, l in full]

    first = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    first.set_epoch(4)
    it = iter(first)
    for _ in range(2):
        next(it)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["epoch"] == 4 and state["batch"] == 2

    resumed = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the trainer calls set_epoch again for the resumed epoch: the position must survive
    rest = [(torch.stack(v), l) for v, l in resumed]
    assert len(rest) == len(reference) - 2
    for (va, la), (vb, lb) in zip(reference[2:], rest):
        assert torch.equal(va, vb) and torch.equal(la, lb)
    resumed.set_epoch(5)
    assert len(list(resumed)) == resumed.steps_per_epoch


def test_resume_under_another_world_size_or_backend_raises(coded):
    loader = build_train_loader(coded_cfg(coded), Context(), seed=1, out_dir=None)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world size 4 .* world size 1"):
        loader.load_state_dict({**state, "world_size": 4})
    with pytest.raises(ValueError, match="dali-cpu"):
        loader.load_state_dict({**state, "backend": "dali-cpu"})


def test_batch_not_divisible_by_world_or_larger_than_data(coded):
    with pytest.raises(ValueError, match="data.global_batch_size=9"):
        build_train_loader(coded_cfg(coded, global_batch_size=9), Context(rank=0, world_size=2), 0, None)
    with pytest.raises(ValueError, match="data.global_batch_size=64"):
        build_train_loader(coded_cfg(coded, global_batch_size=64), Context(), 0, None)
