"""Synthetic backend: the same contract without files."""

from __future__ import annotations

import torch

from supcon_scale.config import DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context


def test_synthetic_contract_and_resume():
    cfg = DataConfig(backend="synthetic", global_batch_size=8, image_size=16, views=2, num_classes=5)
    loader = build_train_loader(cfg, Context(rank=1, world_size=2), seed=3, out_dir=None)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    views, labels = batches[0]
    assert [v.shape for v in views] == [(4, 3, 16, 16)] * 2 and views[0].dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    resumed = build_train_loader(cfg, Context(rank=1, world_size=2), seed=3, out_dir=None)
    resumed.load_state_dict({**loader.state_dict(), "batch": 7})
    rest = list(resumed)
    assert len(rest) == len(batches) - 7
    assert torch.equal(rest[0][0][1], batches[7][0][1]) and torch.equal(rest[0][1], batches[7][1])
