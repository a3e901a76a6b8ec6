"""Honest robustness: the severity axis as scored, and mCE against AlexNet only on ImageNet-C's 1,000 classes at all
five severities, otherwise against a baseline model scored on the same severities (or none, saying why)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_rows import one_line_error, run_cli

from supcon_scale.evaluation.mce import choose_baseline, corruption_errors_to_mce
from supcon_scale.evaluation.plots import accuracy_vs_severity_figure
from supcon_scale.evaluation.robustness import normalise
from supcon_scale.export import encoder_metadata, export_encoder
from supcon_scale.models import create_encoder

ALEXNET_FOG = 0.819324  # Hendrycks & Dietterich 2019, typed in again


@pytest.mark.parametrize("severities", [[1, 3, 5], [2], [1, 2, 3, 4, 5]])
def test_the_severity_axis_shows_the_severities_scored(severities):
    errors = {"fog": [0.1 * s for s in severities], "snow": [0.05 * s for s in severities]}
    fig = accuracy_vs_severity_figure({"m": {"errors": errors, "clean_error": 0.02}}, severities)
    (ax,) = fig.axes
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", *map(str, severities)]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, *severities]
    want = [98.0] + [100 * (1 - (0.1 * s + 0.05 * s) / 2) for s in severities]
    assert list(line.get_ydata()) == pytest.approx(want, rel=1e-12)


def test_a_three_severity_mean_is_never_divided_by_alexnets_five():
    with pytest.raises(ValueError, match=r"errors.fog: 3 severity error\(s\), but AlexNet's errors are means over all"):
        corruption_errors_to_mce({"fog": [0.5, 0.6, 0.7]}, clean_error=0.1)
    with pytest.raises(ValueError, match=r"baseline.fog: 5 severity error\(s\), but the model has 3"):
        corruption_errors_to_mce({"fog": [0.5, 0.6, 0.7]}, baseline={"fog": [0.5] * 5, "clean": 0.1})
    # all five: the paper's CE, sum over severities divided by AlexNet's sum (5 x its mean)
    out = corruption_errors_to_mce({"fog": [0.5, 0.6, 0.7, 0.8, 0.9]})
    assert out["ce"]["fog"] == pytest.approx(100 * 3.5 / (5 * ALEXNET_FOG), rel=1e-12)


@pytest.mark.parametrize(
    ("name", "severities", "classes", "want", "why"),
    [
        (None, [1, 2, 3, 4, 5], 1000, "alexnet", "1,000 classes at all five severities"),
        (None, [5, 4, 3, 2, 1], 1000, "alexnet", "Hendrycks & Dietterich 2019"),
        (None, [1, 3, 5], 1000, None, "severities 1 3 5 are not all five"),
        (None, [1, 2, 3, 4, 5], 10, None, "the dataset has 10 classes, not ImageNet's 1,000"),
        ("ce", [1, 3, 5], 10, "ce", "--baseline ce: a model scored on the same images at the same severities"),
        ("ce", [1, 2, 3, 4, 5], 1000, "ce", "--baseline ce"),
        ("alexnet", [1, 2, 3, 4, 5], 1000, "alexnet", "--baseline alexnet"),
    ],
)
def test_which_baseline_and_why(name, severities, classes, want, why):
    baseline, reason = choose_baseline(name, ["ce", "supcon"], severities, classes)
    assert baseline == want and why in reason
    if want is None:
        assert "--baseline NAME" in reason


@pytest.mark.parametrize(
    ("name", "severities", "classes", "match"),
    [
        ("alexnet", [1, 3, 5], 1000, "--baseline: alexnet does not apply here: severities 1 3 5 are not all five"),
        ("alexnet", [1, 2, 3, 4, 5], 10, "--baseline: alexnet does not apply here: the dataset has 10 classes"),
        ("resnet", [1, 3, 5], 10, "--baseline: 'resnet' is not one of the checkpoints"),
    ],
)
def test_a_baseline_that_does_not_apply_is_refused(name, severities, classes, match):
    with pytest.raises(ValueError, match=match):
        choose_baseline(name, ["ce", "supcon"], severities, classes)


def test_mce_against_a_model_on_three_severities_by_hand():
    """Two corruptions at severities 1, 3, 5; the baseline model errs on both. Hand-computed:
    fog: model mean 0.3 / baseline mean 0.6 = 50%; snow: 0.2 / 0.5 = 40%; mCE 45.
    relative: fog (0.3 - 0.1) / (0.6 - 0.2) = 50%; snow (0.2 - 0.1) / (0.5 - 0.2) = 33.33%; relative mCE 41.67."""
    models = {
        "ce": {"errors": {"fog": [0.4, 0.6, 0.8], "snow": [0.3, 0.5, 0.7]}, "clean_error": 0.2},
        "supcon": {"errors": {"fog": [0.1, 0.3, 0.5], "snow": [0.1, 0.2, 0.3]}, "clean_error": 0.1},
    }
    assert normalise(models, "ce", ["fog", "snow"]) == ["fog", "snow"]
    m = models["supcon"]
    assert m["ce"] == pytest.approx({"fog": 50.0, "snow": 40.0}, rel=1e-12)
    assert m["mce"] == pytest.approx(45.0, rel=1e-12)
    assert m["relative_ce"] == pytest.approx({"fog": 50.0, "snow": 100 / 3}, rel=1e-12)
    assert m["relative_mce"] == pytest.approx((50 + 100 / 3) / 2, rel=1e-12)
    assert models["ce"]["mce"] == pytest.approx(100.0, rel=1e-12)


def test_no_baseline_leaves_ce_out():
    models = {"m": {"errors": {"fog": [0.4, 0.6, 0.8]}, "clean_error": 0.2}}
    assert normalise(models, None, ["fog"]) == [] and "mce" not in models["m"] and "ce" not in models["m"]


# ---------------------------------------------------------------------------------------------------------------
# Through the CLI, on 3 digits x (12 train, 4 val) at 32 px


@pytest.fixture(scope="module")
def tiny(digits, tmp_path_factory) -> dict[str, Path]:
    from supcon_scale.evaluation.c_dataset import generate_c

    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 12), ("val", 4)):
        for c in ("0", "1", "7"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((digits / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    torch.manual_seed(0)
    enc = export_encoder(create_encoder("resnet18"), root.parent / "enc.safetensors", encoder_metadata("resnet18"))
    c_root = root.parent / "tiny-c"
    generate_c(root / "val", c_root, corruptions=["fog"], severities=[1, 3], image_size=32, workers=1)
    return {"data": root, "enc": enc, "c": c_root}


def _args(tiny: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return ["imagenet-c", "--c-root", tiny["c"], "--checkpoint", f"m={tiny['enc']}", "--clean", tiny["data"],
            "--corruptions", "fog", "--severities", 1, 3, "--out", out, *extra]  # fmt: skip


def test_digits_at_two_severities_get_no_alexnet_mce_and_say_why(tiny, tmp_path, capsys):
    rc, out = run_cli(capsys, _args(tiny, tmp_path / "out"))
    assert rc == 0, out
    report = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert report["baseline"] is None and report["num_classes"] == 3 and report["severities"] == [1, 3]
    assert "severities 1 3 are not all five" in report["baseline_why"]
    assert "the dataset has 3 classes, not ImageNet's 1,000" in report["baseline_why"]
    assert "mce" not in report["models"]["m"] and set(report["plots"]) == {"accuracy_vs_severity"}
    assert "baseline: nothing (no CE or mCE: severities 1 3 are not all five" in " ".join(out.split())


def test_alexnet_named_on_the_digits_is_refused_before_scoring(tiny, tmp_path, capsys):
    rc, err = run_cli(capsys, _args(tiny, tmp_path / "out", "--baseline", "alexnet"))
    assert rc == 2
    one_line_error(err, "--baseline", "alexnet does not apply", "3 classes")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["c", "val"])
def test_an_extra_empty_class_folder_is_one_line_naming_both_folders(tiny, tmp_path, capsys, where):
    c_root, data = tmp_path / "c", tmp_path / "data"
    shutil.copytree(tiny["c"], c_root)
    shutil.copytree(tiny["data"], data)
    extra = (c_root / "fog" / "3" / "9") if where == "c" else (data / "val" / "9")
    extra.mkdir()
    args = _args({**tiny, "c": c_root, "data": data}, tmp_path / "out")
    rc, err = run_cli(capsys, args)
    assert rc == 2
    flag, folder = ("--c-root", c_root / "fog" / "3") if where == "c" else ("--clean", data / "val")
    one_line_error(err, flag, str(data / "train"), str(folder), "only in", ": 9")
    assert not (tmp_path / "out").exists()
