"""data/sharding.py through the loaders: the padding rule without drop_last, and the checks on a saved position."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from data_images import CLASSES, PER_CLASS, coded_cfg, identities
from multiproc import run_ranks

from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context


def _epoch(rank: int, world: int, root: str) -> list[tuple[int, int]]:
    cfg = coded_cfg(Path(root), global_batch_size=3 * world, drop_last=False)
    loader = build_train_loader(cfg, Context(rank=rank, world_size=world), seed=2, out_dir=None)
    loader.set_epoch(1)
    return [c for views, labels in loader for c in identities(views, labels)]


def test_without_drop_last_every_sample_is_seen_and_ranks_are_padded_equally(coded: Path):
    """40 samples on 3 ranks: each rank gets ceil(40/3) = 14, the 2 extra are repeats, none is left out."""
    per_rank = run_ranks(_epoch, 3, str(coded))
    n = CLASSES * PER_CLASS
    assert [len(r) for r in per_rank] == [math.ceil(n / 3)] * 3
    counts = Counter(c for r in per_rank for c in r)
    assert set(counts) == {(k, i) for k in range(CLASSES) for i in range(PER_CLASS)}
    assert sum(counts.values()) - n == 3 * math.ceil(n / 3) - n and max(counts.values()) == 2


@pytest.mark.parametrize("field,value,message", [("seed", 99, "seed"), ("num_samples", 41, "41"), ("batch", 99, "99")])
def test_a_saved_position_from_another_run_is_refused(coded: Path, field: str, value: int, message: str):
    cfg = coded_cfg(coded)
    loader = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    loader.set_epoch(3)
    next(iter(loader))
    state = loader.state_dict()
    other = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    other.load_state_dict(state)  # the same run's position loads
    with pytest.raises(ValueError, match=message):
        other.load_state_dict({**state, field: value})


def test_each_epoch_has_its_own_order(coded: Path):
    """Every epoch is a permutation of the dataset, and two epochs are not the same permutation (seeded by epoch)."""
    cfg = coded_cfg(coded)
    loader = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    orders = []
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        orders.append([c for views, labels in loader for c in identities(views, labels)])
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == len(orders[0])
    assert orders[0] != orders[1]
