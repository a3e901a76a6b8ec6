"""Bad input: the scan, `data.on_bad_file: skip|fail` for both backends, `check-data`, and awkward-but-good files."""

from __future__ import annotations

import json
import os
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
        root=str(root),
        backend=backend,
        global_batch_size=4,
        image_size=16,
        workers=0,
        dali_threads=1,
        on_bad_file=policy,
        drop_last=False,
        augment=AugmentConfig(preset="simclr"),
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


def test_check_data_cli(messy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, bad, _ = messy
    out = tmp_path / "report.json"
    assert main([str(root), "--workers", "2", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert sorted(Path(b["path"]) for b in report["bad"]) == bad
    assert "zero.jpg" in capsys.readouterr().out
    clean = write_coded(tmp_path / "clean", classes=CLASSES, per_class=PER_CLASS)
    assert main([str(clean)]) == 0
    assert main([str(tmp_path / "missing")]) == 2


# --- the scan split over ranks, and its manifest -------------------------------------------------------------------


def _messy_copy(tmp_path: Path) -> tuple[Path, list[Path]]:
    root = write_coded(tmp_path / "data", classes=3, per_class=9)
    bad, _ = write_bad_cases(root)
    return root, bad


def _rank_scan(rank: int, world: int, root: str, out: str) -> tuple[list[tuple[str, str]], int, int]:
    from supcon_scale.data.index import scan_split

    ctx = Context(rank=rank, world_size=world)
    _, bad, stats = scan_split(_cfg(Path(root), "torchvision", "skip"), ctx, Path(out), workers=1)
    return bad, stats.decoded_here, stats.decoded


@pytest.mark.parametrize("cpus, ranks, workers", [({0, 1, 2, 3, 4, 5, 6, 7}, 1, 8), ({2, 3, 4, 5}, 2, 2), ({5}, 4, 1)])
def test_decoding_pool_is_sized_by_this_processes_cpus_shared_by_the_nodes_ranks(monkeypatch, cpus, ranks, workers):
    """Under srun --cpus-per-task the affinity mask, not os.cpu_count(), is what a rank may use."""
    from supcon_scale.data import badfiles

    monkeypatch.setattr(badfiles.os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(badfiles.os, "cpu_count", lambda: 256)
    assert badfiles.default_workers(ranks) == workers


@pytest.mark.parametrize("world", [2, 3])
def test_scan_over_ranks_finds_what_one_process_finds(tmp_path, world):
    from multiproc import run_ranks

    from supcon_scale.data.index import scan_split

    root, bad = _messy_copy(tmp_path)
    _, alone, stats = scan_split(_cfg(root, "torchvision", "skip"), Context(), None, workers=1)
    assert sorted(Path(p) for p, _ in alone) == bad and stats.decoded == stats.samples
    results = run_ranks(_rank_scan, world, str(root), str(tmp_path / f"out{world}"))
    for found, _, total in results:
        assert found == alone and total == stats.samples  # the same list, in the same order, on every rank
    shares = [here for _, here, _ in results]
    assert sum(shares) == stats.samples and max(shares) - min(shares) <= 1  # each rank decoded 1/world
    assert (tmp_path / f"out{world}" / "data_manifest.tsv").is_file()


def test_warm_start_decodes_nothing_and_rescans_only_what_changed(tmp_path):
    root, bad = _messy_copy(tmp_path)
    out = tmp_path / "run"
    cfg = _cfg(root, "torchvision", "skip")
    cold = build_train_loader(cfg, Context(), seed=0, out_dir=out)
    n = cold.index.scan.samples
    assert cold.index.scan.decoded == n and cold.bad_files == 3
    warm = build_train_loader(cfg, Context(), seed=0, out_dir=out)
    assert (warm.index.scan.decoded, warm.index.scan.reused, warm.bad_files) == (0, n, 3)
    assert len(warm.index) == len(cold.index)
    # Overwrite a good file with garbage of the same size and keep its mtime: the manifest is keyed on content, so
    # the warm start decodes it again and finds it; a new file is decoded too, nothing else.
    victim = root / "train" / "c1" / "004.png"
    st = victim.stat()
    victim.write_bytes(b"x" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "train" / "c2" / "new.png").write_bytes((root / "train" / "c2" / "000.png").read_bytes())
    again = build_train_loader(cfg, Context(), seed=0, out_dir=out)
    assert (again.index.scan.decoded, again.index.scan.samples, again.bad_files) == (2, n + 1, 4)
    assert str(victim) in (out / "bad_files.txt").read_text()
    os.utime(victim)  # touched, same bytes: vouched for by its digest, not decoded again
    assert build_train_loader(cfg, Context(), seed=0, out_dir=out).index.scan.decoded == 0


def test_check_data_manifest_serves_a_first_run(tmp_path, monkeypatch):
    from supcon_scale.data.manifest import cache_manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, bad = _messy_copy(tmp_path)
    before = sorted(root.rglob("*"))
    assert main([str(root), "--workers", "1"]) == 1
    assert sorted(root.rglob("*")) == before  # nothing written into the dataset folder
    assert cache_manifest(root).is_file() and cache_manifest(root).is_relative_to(tmp_path / "cache")
    assert scan(root, workers=1, manifest=cache_manifest(root)).decoded == 0
    loader = build_train_loader(_cfg(root, "torchvision", "skip"), Context(), seed=0, out_dir=tmp_path / "run")
    assert loader.index.scan.decoded == 0 and loader.bad_files == 3  # the run is over root/train, under root


def _manifest_error(tmp_path: Path, edit) -> str:
    root, _ = _messy_copy(tmp_path)
    out = tmp_path / "run"
    build_train_loader(_cfg(root, "torchvision", "skip"), Context(), seed=0, out_dir=out)
    path = out / "data_manifest.tsv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))
    with pytest.raises(ValueError) as err:
        build_train_loader(_cfg(root, "torchvision", "skip"), Context(), seed=0, out_dir=out)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


def test_a_manifest_from_another_dataset_or_version_is_refused(tmp_path):
    other = json.dumps({"version": 2, "root": "/elsewhere/imagenet", "kind": "folder"})
    msg = _manifest_error(tmp_path / "a", lambda lines: [f"#supcon_scale data manifest\t{other}\n", *lines[1:]])
    assert "covers /elsewhere/imagenet" in msg and "another dataset" in msg
    msg = _manifest_error(tmp_path / "b", lambda lines: [lines[0].replace('"version": 2', '"version": 0'), *lines[1:]])
    assert "version 0" in msg
    msg = _manifest_error(tmp_path / "c", lambda lines: [lines[0], "c0/000.png\tnot-a-size\n", *lines[2:]])
    assert "line 2 is not a manifest row" in msg
    msg = _manifest_error(tmp_path / "d", lambda lines: ["path\tsize\n", *lines[1:]])
    assert "not a supcon_scale manifest" in msg
