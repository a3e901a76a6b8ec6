"""Linear evaluation on a tiny exported checkpoint (digits), ranks vs one process, kNN and the robustness report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multiproc import run_ranks
from supcon_scale.checkpoint import export_encoder, load_encoder
from supcon_scale.data.eval import EvalDataset
from supcon_scale.models import create_encoder


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory) -> Path:
    """3 classes x 12 train / 6 val images of the digits: enough for multi-rank and report tests."""
    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 12), ("val", 6)):
        for c in ("0", "1", "7"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((digits / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


@pytest.fixture(scope="module")
def digits4(digits, tmp_path_factory) -> Path:
    """The digits 0-3, every image (576 train / 144 val): the full pipeline at a size that trains in seconds."""
    root = tmp_path_factory.mktemp("digits4")
    for split in ("train", "val"):
        for c in ("0", "1", "2", "3"):
            shutil.copytree(digits / split / c, root / split / c)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    return export_encoder(create_encoder("resnet18"), path, "resnet18", cifar_stem=False)


def _plain_features(encoder, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features by a plain loop over the dataset, independent of the evaluation package's extraction."""
    ds = EvalDataset(root, split, 32)
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        f = torch.cat([encoder(b) for b in x.split(256)])
    return f.double().numpy(), np.array([ds[i][1] for i in range(len(ds))])


def test_fast_preset_matches_sklearn_on_the_digits(digits4, checkpoint, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from supcon_scale.evaluation.linear import main

    out = tmp_path / "r.json"
    digits = digits4
    assert main(["--checkpoint", str(checkpoint), "--data", str(digits), "--preset", "fast", "--image-size", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    encoder, _ = load_encoder(checkpoint)
    tx, ty = _plain_features(encoder, digits, "train")
    vx, vy = _plain_features(encoder, digits, "val")
    scaler = StandardScaler().fit(tx)
    l2 = result["l2"]  # the same objective: mean CE + l2/2 ||W||^2  <=>  C = 1 / (l2 * n)
    ref = LogisticRegression(C=1.0 / (l2 * len(ty)), max_iter=1000).fit(scaler.transform(tx), ty)
    ref_top1 = ref.score(scaler.transform(vx), vy)
    # a random-init resnet18 at 32 px is a weak but far-above-chance feature extractor (chance is 0.25)
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0
    assert abs(result["top1"] - ref_top1) <= 0.03, (result["top1"], ref_top1)
    assert result["num_train"] == len(ty) == 576 and result["num_val"] == len(vy) == 144 and result["feature_dim"] == 512


def test_encoder_stays_frozen_and_bad_input_is_exit_2(digits, checkpoint, capsys):
    from supcon_scale.evaluation.linear import linear_eval, main

    encoder, _ = load_encoder(checkpoint)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()
    r = linear_eval(encoder, digits, image_size=32, preset="paper", epochs=1)
    assert r["preset"] == "paper" and r["epochs"] == 1 and r["optimizer"] == "rmsprop"
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert main(["--checkpoint", str(checkpoint), "--data", str(digits / "nope")]) == 2
    assert "data.root" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset"):
        linear_eval(encoder, digits, image_size=32, preset="adam")


def _ranks_linear(rank, world, checkpoint, root):
    from supcon_scale.evaluation.knn import knn_eval
    from supcon_scale.evaluation.linear import fit_linear_probe

    encoder, _ = load_encoder(checkpoint)
    probe, r = fit_linear_probe(encoder, root, image_size=32, preset="sgd", epochs=3, batch_size=8, lr=0.05)
    k = knn_eval(encoder, Path(root) / "train", Path(root) / "val", image_size=32, k=5)
    return r["top1"], probe.fc.weight.detach().clone(), k["top1"]


def test_two_ranks_equal_one_process(small, checkpoint):
    one = _ranks_linear(0, 1, checkpoint, small)
    two = run_ranks(_ranks_linear, 2, checkpoint, small)
    for top1, weight, knn in two:
        assert top1 == one[0] and knn == one[2]
        torch.testing.assert_close(weight, one[1], rtol=1e-4, atol=1e-5)


def test_robustness_report_two_checkpoints(small, checkpoint, tmp_path):
    from supcon_scale.evaluation.robustness import generate_c, robustness_report

    torch.manual_seed(1)
    other = export_encoder(create_encoder("resnet18"), tmp_path / "b.safetensors", "resnet18", cifar_stem=False)
    c_root = tmp_path / "small-c"
    gen = generate_c(small / "val", c_root, corruptions=["gaussian_noise", "fog"], severities=[1, 3], image_size=32, workers=1)
    assert gen["written"] == 18 * 4
    report = robustness_report(
        {"ce": checkpoint, "supcon": other}, c_root, small, tmp_path / "out", "ce",
        corruptions=["gaussian_noise", "fog"], severities=[1, 3],
    )  # fmt: skip
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert set(saved["models"]) == {"ce", "supcon"}
    for name, m in saved["models"].items():
        assert set(m["errors"]) == {"gaussian_noise", "fog"} and all(len(v) == 2 for v in m["errors"].values())
        assert m["images_per_s"] > 0 and 0 <= m["clean_error"] <= 1
    if saved["scored_corruptions"]:
        assert saved["models"]["ce"]["mce"] == pytest.approx(100.0, abs=1e-9)  # the baseline against itself
    for key in ("accuracy_vs_severity", "ce_per_corruption"):
        png = Path(report["plots"][key])
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
