"""Bad input: the scan, `data.on_bad_file: skip|fail` for both backends, `check-data`, and awkward-but-good files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_images import CLASSES, PER_CLASS, write_bad_cases, write_coded
from supcon_scale.config import AugmentConfig, DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.data.badfiles import check_file, main, scan
from supcon_scale.distributed import Context


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    root = write_coded(tmp_path_factory.mktemp("messy"), classes=2, per_class=7)
    bad, good = write_bad_cases(root)
    return root, bad, good


def test_scan_finds_exactly_the_bad_files(messy):
    root, bad, good = messy
    report = scan(root, workers=1)
    assert sorted(Path(p) for p, _ in report.bad) == bad
    reasons = {Path(p).name: r for p, r in report.bad}
    assert "0 bytes" in reasons["zero.jpg"] and "cannot decode" in reasons["notimage.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert len(report.good) == 2 * 7 + len(good)
    for p in good:
        assert check_file(str(p)) is None


def _cfg(root: Path, backend: str, policy: str) -> DataConfig:
    return DataConfig(
        root=str(root), backend=backend, global_batch_size=4, image_size=16, workers=0, dali_threads=1,
        on_bad_file=policy, drop_last=False, augment=AugmentConfig(preset="simclr"),
    )


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_skip_lists_bad_files_and_loads_awkward_ones_as_rgb(messy, backend, tmp_path):
    root, bad, good = messy
    loader = build_train_loader(_cfg(root, backend, "skip"), Context(), seed=0, out_dir=tmp_path)
    assert loader.bad_files == 3
    listed = sorted(Path(line.split("\t")[0]) for line in (tmp_path / "bad_files.txt").read_text().splitlines())
    assert listed == bad
    n = 0
    for views, labels in loader:  # the whole epoch decodes: the CMYK, grayscale and PNG-named-.jpg files included
        assert all(v.shape[1:] == (3, 16, 16) and torch.isfinite(v).all() for v in views)
        n += labels.shape[0]
    assert n == 2 * 7 + len(good)


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_fail_names_the_first_bad_file_before_training(messy, backend, tmp_path):
    root, bad, _ = messy
    with pytest.raises(ValueError, match=r"data.on_bad_file=fail: .*notimage\.jpg: cannot decode.*3 bad"):
        build_train_loader(_cfg(root, backend, "fail"), Context(), seed=0, out_dir=tmp_path)
    assert not (tmp_path / "bad_files.txt").exists()


def test_check_data_cli(messy, tmp_path, capsys):
    root, bad, _ = messy
    out = tmp_path / "report.json"
    assert main([str(root), "--workers", "2", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert sorted(Path(b["path"]) for b in report["bad"]) == bad
    assert "zero.jpg" in capsys.readouterr().out
    clean = write_coded(tmp_path / "clean", classes=CLASSES, per_class=PER_CLASS)
    assert main([str(clean)]) == 0
    assert main([str(tmp_path / "missing")]) == 2
