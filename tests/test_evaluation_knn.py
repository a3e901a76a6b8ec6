"""Honest kNN: k capped at the smallest class (with a warning naming k and the class), an interval and n on every
figure, train and val class lists checked where they meet (knn, the monitor, linear-eval, finetune), and the
monitor's inputs checked before training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_rows import one_line_error, run_cli
from scipy.stats import binomtest

from supcon_scale.console import MetricsLog
from supcon_scale.evaluation.knn import KnnMonitor, cap_k, knn_eval
from supcon_scale.export import encoder_metadata, export_encoder
from supcon_scale.models import create_encoder


def _wilson(correct: int, n: int) -> tuple[float, float]:
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def _brute_top1(tx, ty, qx, qy, num_classes: int, k: int, t: float) -> int:
    """Correct top-1 predictions of a weighted kNN, in float64, written out."""
    train = tx.astype(np.float64) / np.linalg.norm(tx, axis=1, keepdims=True)
    correct = 0
    for q, y in zip(qx.astype(np.float64), qy, strict=True):
        sims = train @ (q / np.linalg.norm(q))
        votes = np.zeros(num_classes)
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[ty[j]] += math.exp(sims[j] / t)
        correct += int(votes.argmax() == y)
    return correct


def test_k_is_capped_at_the_smallest_class_with_a_warning_naming_both(capsys):
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    assert cap_k(10, labels, ["cat", "dog", "eel"]) == (3, "dog")
    assert capsys.readouterr().err.strip() == (
        "[rank 0] warning: knn: k=10 exceeds the 3 train images of class 'dog' (the smallest); using k=3"
    )
    assert cap_k(3, labels, ["cat", "dog", "eel"]) == (3, None) and capsys.readouterr().err == ""
    assert cap_k(4, labels, None, warn=False) == (3, "1") and capsys.readouterr().err == ""


def test_knn_eval_on_tensors_scores_at_the_capped_k_with_its_interval():
    g = torch.Generator().manual_seed(0)
    tx, qx = torch.randn(90, 8, generator=g), torch.randn(41, 8, generator=g)
    ty = torch.cat([torch.zeros(50), torch.ones(30), torch.full((10,), 2)]).long()  # smallest class: 10 rows
    qy = torch.randint(0, 3, (41,), generator=g)
    r = knn_eval(torch.nn.Identity(), (tx, ty), (qx, qy), k=200, temperature=0.1, warn=False)
    correct = _brute_top1(tx.numpy(), ty.numpy(), qx.numpy(), qy.numpy(), 3, 10, 0.1)
    assert (r["k"], r["k_requested"], r["k_capped_by_class"]) == (10, 200, "2")
    assert round(r["top1"] * 41) == correct and r["num_val"] == 41
    assert r["top1_interval_95"] == pytest.approx(_wilson(correct, 41), abs=1e-9)
    assert r["top5_interval_95"] == pytest.approx(_wilson(41, 41), abs=1e-9)  # 3 classes: top-5 is every query


# ---------------------------------------------------------------------------------------------------------------
# Through the CLI, on 3 digits (12, 12 and 9 train images; 4 val each) at 32 px


@pytest.fixture(scope="module")
def tiny(digits, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("knn") / "data"
    for split, n in (("train", {"0": 12, "1": 12, "7": 9}), ("val", {"0": 4, "1": 4, "7": 4})):
        for c, keep in n.items():
            (root / split / c).mkdir(parents=True)
            for f in sorted((digits / split / c).iterdir())[:keep]:
                shutil.copy(f, root / split / c / f.name)
    torch.manual_seed(0)
    enc = export_encoder(create_encoder("resnet18"), root.parent / "enc.safetensors", encoder_metadata("resnet18"))
    return {"data": root, "enc": enc}


def test_knn_command_caps_k_and_prints_every_figure_with_its_interval(tiny, tmp_path, capsys):
    out = tmp_path / "knn.json"
    args = ["knn", "--checkpoint", tiny["enc"], "--data", tiny["data"], "--image-size", 32, "--json", out]
    rc, text = run_cli(capsys, args)
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert (r["k"], r["k_requested"], r["k_capped_by_class"], r["num_val"]) == (9, 200, "7", 12)
    assert "warning: knn: k=200 exceeds the 9 train images of class '7' (the smallest); using k=9" in text
    correct = round(r["top1"] * 12)
    assert r["top1_interval_95"] == pytest.approx(_wilson(correct, 12), abs=1e-9)
    lo, hi = _wilson(correct, 12)
    line = " ".join(text.split())
    assert f"kNN (k=9 (capped from 200 at class '7'), T=0.07): top-1 {100 * r['top1']:.2f} " in line
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}] (n=12)" in line and line.count("(n=12)") == 2  # top-1 and top-5


def _copy(tiny: dict[str, Path], tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    return data


@pytest.mark.parametrize("command", ["knn", "linear-eval", "finetune"])
@pytest.mark.parametrize("change", ["extra_empty_val_class", "missing_val_class", "no_val"])
def test_train_and_val_class_lists_are_checked_where_they_meet(tiny, tmp_path, capsys, command, change):
    data = _copy(tiny, tmp_path)
    if change == "extra_empty_val_class":
        (data / "val" / "9").mkdir()
        names = ["--data", str(data / "train"), str(data / "val"), f"only in {data / 'val'}: 9"]
    elif change == "missing_val_class":
        shutil.rmtree(data / "val" / "1")
        names = ["--data", str(data / "train"), str(data / "val"), f"only in {data / 'train'}: 1"]
    else:
        shutil.rmtree(data / "val")
        names = ["--data", f"directory not found: {data / 'val'}"]
    json_out = tmp_path / "r.json"
    rc, err = run_cli(capsys, [command, "--checkpoint", tiny["enc"], "--data", data, "--json", json_out])
    assert rc == 2
    assert "data.root" not in one_line_error(err, *names)  # the flag the user typed, not a config key
    assert not json_out.exists()


def test_the_monitor_checks_its_splits_when_built(tiny, tmp_path):
    data = _copy(tiny, tmp_path)
    encoder = create_encoder("resnet18")
    (data / "val" / "9").mkdir()
    with pytest.raises(ValueError, match=r"^data.root: the class folders of .* differ \(only in .*: 9\) \(train.knn"):
        KnnMonitor(encoder, data, image_size=32, every_steps=1, metrics=MetricsLog(None))
    shutil.rmtree(data / "val")
    with pytest.raises(ValueError, match=rf"^data.root: directory not found: {data / 'val'} \(train.knn_every"):
        KnnMonitor(encoder, data, image_size=32, every_steps=1, metrics=MetricsLog(None))


def test_train_with_the_monitor_and_no_val_split_stops_before_training(tiny, tmp_path, capsys):
    data, out = _copy(tiny, tmp_path), tmp_path / "run"
    shutil.rmtree(data / "val")
    args = ["train", "--config", "demo/digits", f"data.root={data}", f"out_dir={out}",
            "data.backend=torchvision", "data.image_size=16", "data.global_batch_size=16", "data.workers=0",
            "train.epochs=1", "train.warmup_epochs=0", "train.progress=false", "train.knn_every_epochs=1"]  # fmt: skip
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, "data.root", str(data / "val"), "train.knn_every_epochs")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # not one step trained


def test_the_training_curves_show_the_knn_interval_as_a_band():
    from supcon_scale.evaluation.plots import training_curves_figure

    rows = [{"step": 10, "loss": 2.0, "lr": 0.1, "views_per_s": 5.0},
            {"step": 10, "epoch": 0, "knn_top1": 0.6, "knn_top1_interval_95": [0.5, 0.7]},
            {"step": 20, "epoch": 1, "knn_top1": 0.8, "knn_top1_interval_95": [0.72, 0.86]}]  # fmt: skip
    fig = training_curves_figure(rows)
    knn = fig.axes[3]
    (band,) = knn.collections
    ys = sorted({round(float(y), 6) for x, y in band.get_paths()[0].vertices})
    assert ys == [0.5, 0.7, 0.72, 0.86]
    assert [t.get_text() for t in knn.get_legend().get_texts()] == ["95% interval"]
