"""data.format=shards: WebDataset tar shards made from a folder give the folder's samples; broken shards are named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from data_images import CLASSES, PER_CLASS, coded_cfg, identities

from supcon_scale import cli
from supcon_scale.config import AugmentConfig
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context


@pytest.fixture(scope="module")
def shards(coded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert cli.main(["make-shards", str(coded), str(out), "--shard-size", "7"]) == 0
    return out


def test_make_shards_writes_the_webdataset_layout(shards, coded):
    meta = json.loads((shards / "index.json").read_text())
    assert meta["classes"] == [f"c{k}" for k in range(CLASSES)]
    assert [s["samples"] for s in meta["shards"]] == [7] * 5 + [5]
    with tarfile.open(shards / meta["shards"][0]["path"]) as tf:
        names = tf.getnames()
    assert names[:4] == ["c0/000.png", "c0/000.cls", "c0/001.png", "c0/001.cls"]
    with tarfile.open(shards / meta["shards"][0]["path"]) as tf:
        assert tf.extractfile("c0/001.png").read() == (coded / "train" / "c0" / "001.png").read_bytes()


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_shards_and_folder_give_the_same_batches(coded, shards, backend):
    """Same seed: identical views and labels from the shards and from the folder they were made from."""
    aug = AugmentConfig(preset="simclr")  # random crops, flips and colour: the seeds must line up too
    kw = dict(backend=backend, augment=aug, dali_threads=1, drop_last=False, global_batch_size=12)
    folder = build_train_loader(coded_cfg(coded, **kw), Context(), seed=7, out_dir=None)
    tars = build_train_loader(coded_cfg(shards, format="shards", **kw), Context(), seed=7, out_dir=None)
    assert tars.num_classes == folder.num_classes == CLASSES and tars.steps_per_epoch == folder.steps_per_epoch
    for epoch in (0, 1):
        folder.set_epoch(epoch)
        tars.set_epoch(epoch)
        for (va, la), (vb, lb) in zip(folder, tars, strict=True):
            assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb, strict=True))


def test_every_sample_once_per_epoch(shards):
    loader = build_train_loader(coded_cfg(shards, format="shards"), Context(), seed=3, out_dir=None)
    seen = [c for views, labels in loader for c in identities(views, labels)]
    assert sorted(seen) == [(k, i) for k in range(CLASSES) for i in range(PER_CLASS)]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _broken(shards: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the shards with one problem in shard-000001.tar (or its index entry)."""
    out = tmp_path / how
    out.mkdir()
    meta = json.loads((shards / "index.json").read_text())
    for s in meta["shards"]:
        (out / s["path"]).write_bytes((shards / s["path"]).read_bytes())
    victim = out / "shard-000001.tar"
    with tarfile.open(victim) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    if how == "truncated":
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) // 2])
    elif how == "no_label":
        _tar(victim, [m for m in members if m[0] != "c0/008.cls"])
    elif how == "label_range":
        _tar(victim, [(n, b"9" if n == "c0/008.cls" else d) for n, d in members])
    elif how == "count":
        meta["shards"][1]["samples"] = 8
    (out / "index.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(
    "how,message,skipped",
    [
        ("truncated", r"shard-000001\.tar.*truncated shard", None),
        ("no_label", r"shard-000001\.tar:c0/008: no label \(c0/008\.cls missing\)", 1),
        ("label_range", r"shard-000001\.tar:c0/008: label 9 outside 0\.\.3", 1),
        ("count", r"shard-000001\.tar: .*index\.json lists 8 samples, the tar holds 7", 0),
    ],
)
def test_bad_shards_fail_naming_the_file_or_are_skipped_and_listed(shards, tmp_path, how, message, skipped):
    root = _broken(shards, tmp_path, how)
    with pytest.raises(ValueError, match=r"data.on_bad_file=fail: .*" + message) as err:
        build_train_loader(coded_cfg(root, format="shards", on_bad_file="fail"), Context(), 0, tmp_path / "f")
    assert "\n" not in str(err.value)
    out = tmp_path / "skip"
    loader = build_train_loader(coded_cfg(root, format="shards", on_bad_file="skip"), Context(), 0, out)
    listed = (out / "bad_files.txt").read_text().splitlines()
    assert loader.bad_files == len(listed) >= 1
    if skipped is not None:  # the samples that remain are the good ones, each once
        assert len(loader.index) == CLASSES * PER_CLASS - skipped
    else:  # truncated: what lies before the cut is kept, the rest of the shard is listed as lost
        assert CLASSES * PER_CLASS - 7 <= len(loader.index) < CLASSES * PER_CLASS
    seen = [c for views, labels in loader for c in identities(views, labels)]
    assert len(seen) == len(set(seen)) == loader.steps_per_epoch * 8


def test_a_corrupt_image_in_a_shard_is_found_by_the_scan(shards, tmp_path):
    root = _broken(shards, tmp_path, "none")
    victim = root / "shard-000002.tar"
    with tarfile.open(victim) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    _tar(victim, [(n, d[: len(d) // 2] if n == "c1/005.png" else d) for n, d in members])
    with pytest.raises(ValueError, match=r"shard-000002\.tar:c1/005: cannot decode"):
        build_train_loader(coded_cfg(root, format="shards", on_bad_file="fail"), Context(), 0, None)


def test_missing_index_or_shard(shards, tmp_path):
    with pytest.raises(ValueError, match=r"needs .*index\.json .*make-shards"):
        build_train_loader(coded_cfg(tmp_path, format="shards"), Context(), 0, None)
    root = _broken(shards, tmp_path, "none")
    (root / "shard-000003.tar").unlink()
    with pytest.raises(ValueError, match=r"lists .*shard-000003\.tar, which does not exist"):
        build_train_loader(coded_cfg(root, format="shards"), Context(), 0, None)


def test_the_shards_loader_declares_the_classes_present(shards):
    loader = build_train_loader(coded_cfg(shards, format="shards"), Context(), seed=3, out_dir=None)
    assert (loader.num_classes, loader.classes_present) == (CLASSES, CLASSES)
