"""Sharded evaluations on uneven shares (issue 28 item 4): 7 images on 2 ranks (shares of 4 and 3) give the numbers
of one process, for feature extraction, kNN scoring, the linear probe and ImageNet-C. The equal-share tests elsewhere
cannot see an evaluation that assumes every rank holds as many samples as rank 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_images import write_noise
from multiproc import run_ranks

from supcon_scale.models import create_encoder

IMAGES = 7  # 2 ranks: shares of 4 and 3


def _folder(root: Path, seed: int) -> Path:
    """`root/<class>/*.png`: 7 noise images in 2 classes."""
    tmp = write_noise(root.with_name(root.name + "_tmp"), classes=2, per_class=4, seed=seed)
    (tmp / "train" / "c1" / "3.png").unlink()
    shutil.move(tmp / "train", root)
    tmp.rmdir()
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("shares")
    _folder(base / "train", seed=0)
    _folder(base / "val", seed=1)
    _folder(base / "c" / "gaussian_noise" / "1", seed=2)
    return base


class _Images(torch.utils.data.Dataset):
    """7 fixed random images with labels 0..6 (the rank's share is read through the global index)."""

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), i


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder("test_resnet", False, kwargs={}).eval()


def _evaluations(rank: int, world: int, root: Path) -> dict[str, np.ndarray]:
    """Every sharded evaluation on this rank's share; the results every rank must hold (as arrays: tensors would
    cross the queue as shared memory the exited rank no longer holds)."""
    from supcon_scale.evaluation.features import extract_features
    from supcon_scale.evaluation.knn import knn_scores
    from supcon_scale.evaluation.linear import fit_linear_probe
    from supcon_scale.evaluation.robustness import evaluate_c

    torch.set_num_threads(1)
    encoder = _encoder()
    feats, labels, _ = extract_features(encoder, _Images(), batch_size=2)
    scores = knn_scores(feats, labels % 3, feats.flip(0), num_classes=3, k=3)
    probe, result = fit_linear_probe(encoder, root, image_size=16, preset="sgd", epochs=2, batch_size=4, lr=0.5)
    torch.manual_seed(1)
    classifier = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, 2)).eval()
    c = evaluate_c(classifier, root / "c", image_size=16, corruptions=["gaussian_noise"], severities=[1], resize=True)
    found = {
        "features": feats,
        "labels": labels,
        "knn": scores,
        "probe": probe.fc.weight.detach(),
        "probe_top1": torch.tensor(result["top1"]),
        "c_error": torch.tensor(c["errors"]["gaussian_noise"]),
    }
    return {k: v.numpy().copy() for k, v in found.items()}


def test_features_of_uneven_shares_in_order() -> None:
    """One process: every image once, in dataset order (the fast representative; ranks in the slow test below)."""
    from supcon_scale.evaluation.features import extract_features

    feats, labels, _ = extract_features(_encoder(), _Images(), batch_size=2)
    assert labels.tolist() == list(range(IMAGES)) and feats.shape[0] == IMAGES


@pytest.mark.slow
def test_two_uneven_ranks_equal_one_process(data: Path) -> None:
    one = _evaluations(0, 1, data)
    for ranked in run_ranks(_evaluations, 2, data):
        assert ranked.keys() == one.keys()
        for name in one:
            np.testing.assert_allclose(ranked[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
