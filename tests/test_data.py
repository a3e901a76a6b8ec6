"""The data contract both training backends keep (`supcon_scale.data`): sharding by global rank and exact resume."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from data_images import CLASSES, MEAN, PER_CLASS, STD, coded_cfg, identities, write_coded
from multiproc import run_ranks

from supcon_scale.config import AugmentConfig, DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context

BACKENDS = ("torchvision", "dali-cpu")


def _rank_identities(rank: int, world: int, root: str) -> dict[tuple[str, bool], list[list[tuple[int, int]]]]:
    out = {}
    for backend in BACKENDS:
        for drop_last, batch in ((True, 8), (False, 12)):
            cfg = coded_cfg(Path(root), backend=backend, global_batch_size=batch, drop_last=drop_last, dali_threads=1)
            loader = build_train_loader(cfg, Context(rank=rank, world_size=world), seed=5, out_dir=None)
            loader.set_epoch(2)
            out[backend, drop_last] = [identities(v, lb) for v, lb in loader]
            assert len(out[backend, drop_last]) == loader.steps_per_epoch
    return out


def test_two_ranks_see_every_file_once(coded):
    """Both backends, sharded by global rank: every file once per epoch, equal batch counts and sizes per rank."""
    results = run_ranks(_rank_identities, 2, str(coded))
    for key in results[0]:
        drop_last = key[1]
        per_rank = [r[key] for r in results]
        assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on every rank
        for b0, b1 in zip(*per_rank, strict=True):
            assert len(b0) == len(b1)
        seen = [c for rank in per_rank for batch_ in rank for c in batch_]
        assert sorted(seen) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]
        if not drop_last:
            assert [len(b) for b in per_rank[0]] == [6, 6, 6, 2]


@pytest.mark.parametrize("backend,preset", [("torchvision", "simclr"), ("dali-cpu", "stacked_randaugment")])
def test_resume_mid_epoch_yields_the_remaining_batches(coded, backend, preset):
    cfg = coded_cfg(coded, backend=backend, augment=AugmentConfig(preset=preset), workers=2, dali_threads=2)
    full = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    full.set_epoch(4)
    reference = [(torch.stack(v), lb) for v, lb in full]

    first = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    first.set_epoch(4)
    it = iter(first)
    for _ in range(2):
        next(it)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["epoch"] == 4 and state["batch"] == 2 and state["backend"] == backend

    resumed = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the trainer calls set_epoch again for the resumed epoch: the position must survive
    rest = [(torch.stack(v), lb) for v, lb in resumed]
    assert len(rest) == len(reference) - 2
    pixels = torch.cat([v for v, _ in reference]) * STD + MEAN
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    for (va, la), (vb, lb) in zip(reference[2:], rest, strict=True):
        assert torch.equal(va, vb) and torch.equal(la, lb)
    resumed.set_epoch(5)
    assert len(list(resumed)) == resumed.steps_per_epoch

    other = "dali-cpu" if backend == "torchvision" else "torchvision"
    if backend == "torchvision":  # the position is global: another world size continues the same global order
        resumed.load_state_dict({**state, "world_size": 2})
        assert [torch.equal(torch.stack(v), va) for (va, _), (v, _) in zip(reference[2:], resumed, strict=False)] == [
            True
        ] * 3
    else:  # DALI's reader checkpoint is per rank
        with pytest.raises(ValueError, match="world size 2 .* world size 1"):
            resumed.load_state_dict({**state, "world_size": 2})
    with pytest.raises(ValueError, match=other):
        resumed.load_state_dict({**state, "backend": other})


def test_batch_not_divisible_by_world_or_larger_than_data(coded):
    with pytest.raises(ValueError, match="data.global_batch_size=9"):
        build_train_loader(coded_cfg(coded, global_batch_size=9), Context(rank=0, world_size=2), 0, None)
    with pytest.raises(ValueError, match="data.global_batch_size=64"):
        build_train_loader(coded_cfg(coded, global_batch_size=64), Context(), 0, None)


@pytest.mark.parametrize("backend,workers", [("torchvision", (0, 2)), ("dali-cpu", (0, 0))])
def test_same_seed_same_batches(digits, backend, workers):
    """The same seed gives the same batches (torchvision: whatever the number of workers); another seed does not."""

    def batches(seed: int, workers: int) -> list[torch.Tensor]:
        cfg = DataConfig(
            root=str(digits), backend=backend, global_batch_size=8, image_size=16, workers=workers, dali_threads=2
        )
        loader = build_train_loader(cfg, Context(), seed, None)
        loader.set_epoch(1)
        out = []
        for views, labels in loader:
            out.append(torch.cat([torch.stack(views).flatten(), labels.float()]))
            if len(out) == 3:
                break
        return out

    a, b, c = batches(7, workers[0]), batches(7, workers[1]), batches(8, workers[0])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu", "synthetic"])
def test_every_loader_declares_the_classes_present(tmp_path, backend):
    """`TrainLoader.classes_present`: the class folders holding an image (an empty folder counts in num_classes
    only); the synthetic loader draws its labels from every class of data.num_classes."""
    root = write_coded(tmp_path, classes=3, per_class=4)
    (root / "train" / "c3").mkdir()
    extra = {"num_classes": 5} if backend == "synthetic" else {}
    loader = build_train_loader(coded_cfg(root, backend=backend, dali_threads=1, **extra), Context(), 0, None)
    assert (loader.num_classes, loader.classes_present) == ((5, 5) if backend == "synthetic" else (4, 3))
