"""data.format=cifar: CIFAR's official python archives on local disk, both backends, bad archives, the recipe."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_images import CLASSES, PER_CLASS, coded_cfg, coded_colour, decode_colour, identities

from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context

REPO = Path(__file__).resolve().parent.parent


def write_cifar10(root: Path, batches: int = 5) -> Path:
    """`root/cifar-10-batches-py` as the official tarball holds it (Python 2 era dicts with bytes keys).

    40 training images of uniform code colours (class k, item i) over `batches` data batches, 8 test images.
    """
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    codes = [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]
    order = np.random.default_rng(0).permutation(len(codes))  # the official batches are not sorted by class
    images = np.stack([np.full((32, 32, 3), coded_colour(*codes[j]), np.uint8) for j in order])
    labels = [codes[j][0] for j in order]
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # rows of R plane, G plane, B plane
    per = len(images) // batches
    for b in range(batches):
        rows = slice(b * per, (b + 1) * per)
        batch = {b"batch_label": b"training batch", b"labels": labels[rows], b"data": planes[rows]}
        (out / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"labels": labels[:8], b"data": planes[:8]}
    (out / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (out / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_every_image_once_per_epoch_with_its_label(cifar, backend):
    loader = build_train_loader(coded_cfg(cifar, format="cifar", backend=backend), Context(), seed=2, out_dir=None)
    assert loader.num_classes == 10 and loader.steps_per_epoch == CLASSES * PER_CLASS // 8
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = [c for views, labels in loader for c in identities(views, labels)]
        assert sorted(seen) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]


def test_backends_read_the_same_pixels(cifar):
    from supcon_scale.data.cifar import cifar_index

    index = cifar_index(cifar)
    assert index.images.shape == (40, 32, 32, 3) and index.raw
    assert np.array_equal(np.asarray(index.image(3)), index.encoded(3))
    codes = [decode_colour(index.images[j].reshape(-1, 3).mean(0)) for j in range(len(index))]
    assert [k for k, _ in codes] == index.labels  # the planes were put back together as RGB, labels beside them
    assert sorted(codes) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]


def _break(root: Path, how: str) -> Path:
    d = root / "cifar-10-batches-py"
    if how == "missing":
        (d / "data_batch_3").unlink()
    elif how == "truncated":
        raw = (d / "data_batch_2").read_bytes()
        (d / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    elif how == "label":
        batch = pickle.loads((d / "data_batch_4").read_bytes(), encoding="bytes")
        batch[b"labels"][0] = 10
        (d / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=2))
    elif how == "code":
        (d / "data_batch_1").write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # a pickle that would run a command
    return d


@pytest.mark.parametrize(
    "how,message",
    [
        ("missing", r"incomplete cifar10 archive: .*data_batch_3 is missing"),
        ("truncated", r"data_batch_2 is not a CIFAR python archive"),
        ("label", r"data_batch_4: .labels. holds labels outside 0..9"),
        ("code", r"data_batch_1 is not a CIFAR python archive .*os.system is not allowed"),
    ],
)
def test_bad_archives_are_one_line_errors_naming_the_file(tmp_path, how, message):
    root = write_cifar10(tmp_path)
    _break(root, how)
    with pytest.raises(ValueError, match=message) as err:
        build_train_loader(coded_cfg(root, format="cifar"), Context(), seed=0, out_dir=None)
    assert "\n" not in str(err.value)


def test_no_archive_or_two_archives(tmp_path):
    with pytest.raises(ValueError, match="no CIFAR python archive"):
        build_train_loader(coded_cfg(tmp_path, format="cifar"), Context(), seed=0, out_dir=None)
    root = write_cifar10(tmp_path)
    (root / "cifar-100-python").mkdir()
    (root / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(ValueError, match="both a CIFAR-10 and a CIFAR-100"):
        build_train_loader(coded_cfg(root, format="cifar"), Context(), seed=0, out_dir=None)


def test_cifar_recipe_trains_two_steps(cifar, tmp_path):
    """The cifar/supcon_resnet50 recipe as written, on the test archive: only size, device and length overridden."""
    from supcon_scale import cli

    out = tmp_path / "run"
    overrides = [
        f"data.root={cifar}",
        f"out_dir={out}",
        "device=cpu",
        "precision=fp32",
        "data.global_batch_size=8",
        "train.max_steps=2",
        "train.log_every=1",
        "data.workers=0",
        "data.dali_threads=1",
    ]
    assert (
        cli.main(["train", "--config", str(REPO / "supcon_scale/recipes/cifar/supcon_resnet50.yaml"), *overrides]) == 0
    )
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2
