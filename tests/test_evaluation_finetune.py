"""`supcon-scale finetune`: the whole encoder trains with a new head (standard and CIFAR stem)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from supcon_scale.export import encoder_from_export, encoder_metadata, export_encoder
from supcon_scale.models import create_encoder


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    for split, n in (("train", 12), ("val", 6)):
        for c in ("0", "1", "7"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((digits / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_finetune_trains_every_encoder_weight_and_reports_the_final_epoch(small, tmp_path, cifar_stem):
    from supcon_scale.cli import main

    torch.manual_seed(0)
    encoder = create_encoder("resnet18", cifar_stem=cifar_stem)
    path = export_encoder(
        encoder, tmp_path / "encoder.safetensors", encoder_metadata("resnet18", cifar_stem=cifar_stem)
    )
    out, saved = tmp_path / "r.json", tmp_path / "tuned.safetensors"
    argv = ["finetune", "--checkpoint", str(path), "--data", str(small), "--epochs", "2", "--batch-size", "12",
            "--lr", "0.05", "--image-size", "32", "--json", str(out), "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "finetune" and r["epochs"] == 2 and r["num_val"] == 18 and 0 <= r["top1"] <= 1
    lo, hi = r["interval_95"]
    assert lo <= r["top1"] <= hi
    tuned, meta = encoder_from_export(saved)
    assert meta["cifar_stem"] == str(int(cifar_stem))
    before, after = encoder.state_dict(), tuned.state_dict()
    weights = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in weights if k.endswith("conv1.weight"))
    changed = sum(not torch.equal(before[k], after[k]) for k in weights)
    assert changed == len(weights)  # nothing is frozen: every encoder tensor moved
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)  # BN statistics update


def test_finetune_bad_input_is_exit_2(small, tmp_path, capsys):
    from supcon_scale.cli import main

    path = export_encoder(create_encoder("resnet18"), tmp_path / "e.safetensors", encoder_metadata("resnet18"))
    assert main(["finetune", "--checkpoint", str(path), "--data", str(small), "--epochs", "0"]) == 2
    assert "finetune: error" in capsys.readouterr().err
