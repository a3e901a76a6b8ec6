"""torchvision backend: views, labels, epoch order and determinism whatever the worker count."""

from __future__ import annotations

import torch
from data_images import CLASSES, MEAN, PER_CLASS, STD, coded_cfg, identities

from supcon_scale.config import DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context


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
