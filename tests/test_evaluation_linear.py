"""Linear evaluation on a tiny exported checkpoint (digits), ranks vs one process, kNN and the robustness report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import run_ranks

from supcon_scale.data.eval import EvalDataset
from supcon_scale.export import encoder_from_export, encoder_metadata, export_encoder
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
    return export_encoder(create_encoder("resnet18"), path, encoder_metadata("resnet18"))


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
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(digits),
                "--preset",
                "fast",
                "--image-size",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    encoder, _ = encoder_from_export(checkpoint)
    tx, ty = _plain_features(encoder, digits, "train")
    vx, vy = _plain_features(encoder, digits, "val")
    scaler = StandardScaler().fit(tx)
    l2 = result["l2"]  # the same objective: mean CE + l2/2 ||W||^2  <=>  C = 1 / (l2 * n)
    ref = LogisticRegression(C=1.0 / (l2 * len(ty)), max_iter=1000).fit(scaler.transform(tx), ty)
    ref_top1 = ref.score(scaler.transform(vx), vy)
    # a random-init resnet18 at 32 px is a weak but far-above-chance feature extractor (chance is 0.25)
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0
    assert abs(result["top1"] - ref_top1) <= 0.03, (result["top1"], ref_top1)
    assert (
        result["num_train"] == len(ty) == 576 and result["num_val"] == len(vy) == 144 and result["feature_dim"] == 512
    )


def test_encoder_stays_frozen_and_bad_input_is_exit_2(digits, checkpoint, capsys):
    from supcon_scale.evaluation.linear import linear_eval, main

    encoder, _ = encoder_from_export(checkpoint)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()
    r = linear_eval(encoder, digits, image_size=32, preset="paper", epochs=1)
    assert r["preset"] == "paper" and r["epochs"] == 1 and r["optimizer"] == "rmsprop"
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert main(["--checkpoint", str(checkpoint), "--data", str(digits / "nope")]) == 2
    err = capsys.readouterr().err  # the flag the user typed, not a config key
    assert f"--data: directory not found: {digits / 'nope' / 'train'}" in err and "data.root" not in err
    with pytest.raises(ValueError, match="--preset"):
        linear_eval(encoder, digits, image_size=32, preset="adam")


def _ranks_linear(rank, world, checkpoint, root):
    from supcon_scale.evaluation.knn import knn_eval
    from supcon_scale.evaluation.linear import fit_linear_probe

    encoder, _ = encoder_from_export(checkpoint)
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
    other = export_encoder(create_encoder("resnet18"), tmp_path / "b.safetensors", encoder_metadata("resnet18"))
    c_root = tmp_path / "small-c"
    gen = generate_c(
        small / "val", c_root, corruptions=["gaussian_noise", "fog"], severities=[1, 3], image_size=32, workers=1
    )
    assert gen["written"] == 18 * 4
    report = robustness_report(
        {"ce": checkpoint, "supcon": other}, c_root, small, tmp_path / "out", "ce",
        corruptions=["gaussian_noise", "fog"], severities=[1, 3],
    )  # fmt: skip
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert set(saved["models"]) == {"ce", "supcon"}
    for m in saved["models"].values():
        assert set(m["errors"]) == {"gaussian_noise", "fog"} and all(len(v) == 2 for v in m["errors"].values())
        assert m["images_per_s"] > 0 and 0 <= m["clean_error"] <= 1
    # a corruption where the baseline errs nowhere is left out (its CE is undefined); at least one is scored here
    assert saved["scored_corruptions"] and set(saved["scored_corruptions"]) <= {"gaussian_noise", "fog"}
    # the baseline against itself: CE 100 on every scored corruption
    assert saved["models"]["ce"]["mce"] == pytest.approx(100.0, abs=1e-9)
    other_ce = {c: 100 * sum(saved["models"]["supcon"]["errors"][c]) / sum(saved["models"]["ce"]["errors"][c])
                for c in saved["scored_corruptions"]}  # fmt: skip
    assert saved["models"]["supcon"]["mce"] == pytest.approx(sum(other_ce.values()) / len(other_ce), rel=1e-9)
    for key in ("accuracy_vs_severity", "ce_per_corruption"):
        png = Path(report["plots"][key])
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# The official protocol (google-research/supcon stage 2) and main_linear.py


def _tf_rmsprop_reference(w0: np.ndarray, grads: list[np.ndarray], lrs: list[float], wd: float) -> np.ndarray:
    """TF's RMSPropOptimizer in float64, written out: ms from 1, eps inside the root, LR inside momentum."""
    w, ms, mom = w0.astype(np.float64).copy(), np.ones_like(w0, dtype=np.float64), np.zeros_like(w0, dtype=np.float64)
    for g, lr in zip(grads, lrs, strict=True):
        g = g + wd * w  # the L2 term of the loss: d/dw wd * |w|^2 / 2
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + lr * g / np.sqrt(ms + 1e-3)
        w = w - mom
    return w


def _tf_schedule(step: int, peak: float, spe: float, warmup_epochs: float, rate: float, every: float) -> float:
    """utils.build_learning_rate_schedule with EXPONENTIAL decay, written out from the official source."""
    warm = int(warmup_epochs * spe)
    if step < warm:
        return peak * step / warm
    return peak * rate ** ((step - warm) // (spe * every))


def test_official_optimizer_and_schedule_match_timm_rmsproptf_and_tf_step_for_step():
    from timm.optim import RMSpropTF

    from supcon_scale.evaluation.linear import PRESETS, lr_at, make_optimizer

    p = PRESETS["official_imagenet"]
    spe, peak, steps = 5.5, 0.05 * 6144 / 256, 300
    lrs = [lr_at(p, peak, s, spe, steps) for s in range(steps)]
    assert lrs == pytest.approx([_tf_schedule(s, peak, spe, 12.0, 0.97, 0.5) for s in range(steps)], rel=1e-12)
    assert lrs[0] == 0 and max(lrs) == pytest.approx(peak) and lrs[-1] < lrs[100]  # warm-up from 0, then decay
    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64)
    grads = [torch.randn(7, 5, dtype=torch.float64) for _ in range(steps)]
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = make_optimizer(p, [ours], lrs[0])
    ref = RMSpropTF([theirs], lr=lrs[0], alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-6)  # the test drives it
    for g, lr in zip(grads, lrs, strict=True):
        for o, param in ((opt, ours), (ref, theirs)):
            for group in o.param_groups:
                group["lr"] = lr
            param.grad = g.clone()
            o.step()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # every step, bit for bit
    expected = _tf_rmsprop_reference(w0.numpy(), [g.numpy() for g in grads], lrs, 1e-6)
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    # torch's RMSprop (the old "paper" preset) moves far more: accumulator from 0, eps outside the root
    plain = torch.nn.Parameter(w0.clone())
    torch_opt = torch.optim.RMSprop([plain], lr=lrs[0], alpha=0.9, momentum=0.9, eps=1e-3, weight_decay=1e-6)
    for g, lr in zip(grads[:50], lrs[:50], strict=True):
        torch_opt.param_groups[0]["lr"] = lr
        plain.grad = g.clone()
        torch_opt.step()
    assert not torch.allclose(
        plain, torch.as_tensor(_tf_rmsprop_reference(w0.numpy(), [g.numpy() for g in grads[:50]], lrs[:50], 1e-6))
    )


def test_cifar_and_hobbitlong_schedules():
    from supcon_scale.evaluation.linear import PRESETS, lr_at

    cifar, hob = PRESETS["official_cifar"], PRESETS["hobbitlong"]
    spe = 10.0  # 100 steps per 10 epochs
    factor = lambda p, s: lr_at(p, 1.0, s, spe, 1000)  # noqa: E731
    assert [factor(cifar, s) for s in (0, 600, 601, 751, 901)] == pytest.approx([1, 1, 0.2, 0.04, 0.008])
    # main_linear.py: epoch e (1-based) uses 0.2 ** #(e > 60, 75, 90); epoch 61 starts at step 600
    assert [factor(hob, s) for s in (0, 599, 600, 750, 900)] == pytest.approx([1, 1, 0.2, 0.04, 0.008])


def _stage1(tmp_path: Path, image_size: int, cifar: bool):
    from supcon_scale import config

    text = (
        f"data: {{global_batch_size: 12, image_size: {image_size}, eval_crop: {'identity' if cifar else 'resize_crop'},"
        " augment: {preset: none, crop_scale: [1.0, 1.0], flip_p: 0.0}}\n"
        f"model: {{encoder: resnet18, cifar_stem: {str(cifar).lower()}, normalize_encoder_output: true}}\n"
    )
    (tmp_path / "config.yaml").write_text(text)
    return config.load(tmp_path / "config.yaml")


def test_official_protocol_trains_as_the_reference_loop_with_batch_norm_frozen(small, tmp_path):
    """The stream, BN in train mode without updates, normalised features, smoothing, TF RMSProp and schedule:
    fit_linear_probe's head equals a loop written here with timm's RMSpropTF, and no BN buffer moves."""
    import copy

    import torch.nn.functional as F
    from timm.optim import RMSpropTF

    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.evaluation.linear import fit_linear_probe, stream_batches

    stage1 = _stage1(tmp_path, 32, cifar=False)
    torch.manual_seed(0)
    encoder = create_encoder("resnet18")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    modes = []
    encoder.layer1.register_forward_hook(lambda m, i, o: modes.append(encoder.bn1.training))
    probe, r = fit_linear_probe(
        copy.deepcopy(encoder), small, image_size=32, preset="official", epochs=20, stage1=stage1
    )
    assert r["protocol"] == "official_imagenet" and r["batch_size"] == 12 and r["lr"] == pytest.approx(0.05 * 12 / 256)
    assert r["normalize_features"] and r["stream"] == "stage1" and r["batch_norm"] == "train_frozen"
    trained = probe.encoder.state_dict()
    assert all(torch.equal(before[k], trained[k]) for k in before)  # running stats and counters unchanged

    # the reference: the same 60 batches (36 images / 12 per step x 20 epochs), plain loops, timm's optimizer
    ref_encoder = copy.deepcopy(encoder)
    ref_encoder.layer1.register_forward_hook(lambda m, i, o: modes.append(ref_encoder.bn1.training))
    for m in ref_encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    ref_encoder.train()
    images = EvalDataset(small, "train", 32, crop="identity")  # crop scale 1, no flip or colour: the image itself
    fc = torch.nn.Linear(512, 3)
    torch.nn.init.zeros_(fc.weight), torch.nn.init.zeros_(fc.bias)
    opt = RMSpropTF(fc.parameters(), lr=0.0, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-6)
    spe = 36 / 12
    for step, batch in enumerate(stream_batches(36, 12, 60, seed=0)):
        x = torch.stack([images[i][0] for i in batch.tolist()])
        y = torch.tensor([images[i][1] for i in batch.tolist()])
        with torch.no_grad():
            feats = F.normalize(ref_encoder(x), dim=-1)
        opt.param_groups[0]["lr"] = _tf_schedule(step, 0.05 * 12 / 256, spe, 12.0, 0.97, 0.5)
        opt.zero_grad()
        F.cross_entropy(fc(feats), y, label_smoothing=0.05).backward()
        opt.step()
    torch.testing.assert_close(probe.fc.weight, fc.weight, rtol=1e-4, atol=1e-6)
    assert modes and all(modes)  # batch norm ran in train mode (batch statistics) in both


def test_linear_eval_cli_official_on_exported_encoders(small, tmp_path):
    """`linear-eval --protocol official` reads the run's config beside the encoder: ImageNet form for a standard stem,
    CIFAR form (identity evaluation at 32 px) for a CIFAR stem."""
    from supcon_scale.cli import main

    for cifar in (False, True):
        run = tmp_path / ("cifar" if cifar else "imagenet")
        run.mkdir()
        _stage1(run, 32, cifar)
        torch.manual_seed(0)
        export_encoder(
            create_encoder("resnet18", cifar_stem=cifar),
            run / "encoder.safetensors",
            encoder_metadata("resnet18", cifar_stem=cifar),
        )
        out = run / "r.json"
        argv = ["linear-eval", "--checkpoint", str(run / "encoder.safetensors"), "--data", str(small), "--protocol",
                "official", "--epochs", "2", "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        r = json.loads(out.read_text())
        assert r["protocol"] == ("official_cifar" if cifar else "official_imagenet")
        assert r["eval_crop"] == ("identity" if cifar else "resize_crop") and r["num_val"] == 18
        assert r["optimizer"] == ("sgd" if cifar else "rmsprop") and r["epochs"] == 2


def test_hobbitlong_protocol_runs_with_eval_mode_batch_norm(small, checkpoint):
    from supcon_scale.evaluation.linear import linear_eval

    encoder, _ = encoder_from_export(checkpoint)
    r = linear_eval(encoder, small, image_size=32, preset="hobbitlong", epochs=1)
    assert r["protocol"] == "hobbitlong" and r["lr"] == 0.1 and r["batch_size"] == 256 and r["batch_norm"] == "eval"
    assert r["stream"] == "crop_flip" and 0 <= r["top1"] <= 1


def test_identity_eval_crop_refuses_a_resize():
    from PIL import Image

    from supcon_scale.data.eval import eval_transform

    assert eval_transform(32, crop="identity")(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="data.eval_crop=identity"):
        eval_transform(32, crop="identity")(Image.new("RGB", (40, 40)))
    assert eval_transform(32)(Image.new("RGB", (40, 60))).shape == (3, 32, 32)  # resize 37 then centre-crop 32


def test_wilson_interval_against_its_formula_and_overlap():
    from scipy.stats import binomtest

    from supcon_scale.evaluation.stats import accuracy_interval, format_accuracy, wilson_interval, within_noise

    for k, n in ((0, 10), (351, 360), (360, 360), (50, 100)):
        lo, hi = wilson_interval(k, n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # the interval always holds the accuracy itself, even where the float formula rounds past it (hi at 360/360)
    for k, n in ((0, 10), (360, 360), (7, 7), (1000, 1000), (0, 1)):
        lo, hi = accuracy_interval(k / n, n)
        assert lo <= k / n <= hi
    # the demo's old table, 351/360 vs 360/360: [95.3, 98.7] and [98.9, 100] do not overlap, so even that gap is a
    # finding at n = 360 (Fisher's exact test agrees: p = 0.004); 0.95 vs 0.96 on 360 images is not
    assert not within_noise(0.975, 360, 1.0, 360) and within_noise(0.95, 360, 0.96, 360)
    assert not within_noise(0.80, 1000, 0.90, 1000)
    assert format_accuracy(0.975, 360).endswith("(n=360)")


# ---------------------------------------------------------------------------------------------------------------
# The command's promises: --cache-dir, --save-probe / imagenet_c --probe, --augment, the final epoch's accuracy


def _cli(checkpoint: Path, data: Path, out: Path, *extra: str, epochs: int = 3, lr: float = 0.05) -> dict:
    from supcon_scale.evaluation.linear import main

    argv = ["--checkpoint", str(checkpoint), "--data", str(data), "--image-size", "32", "--json", str(out)]
    sgd = ["--preset", "sgd", "--epochs", str(epochs), "--batch-size", "8", "--lr", str(lr)]
    assert main([*argv, *sgd, *extra]) == 0
    return json.loads(out.read_text())


def test_cache_dir_reuses_features_for_the_same_encoder_only(small, checkpoint, tmp_path):
    cache = tmp_path / "cache"
    first = _cli(checkpoint, small, tmp_path / "a.json", "--cache-dir", str(cache))
    assert {p.name for p in cache.iterdir()} == {"features_train.safetensors", "features_val.safetensors"}
    assert "extract_train_s" in first and "extract_val_s" in first
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = _cli(checkpoint, small, tmp_path / "b.json", "--cache-dir", str(cache))
    assert "extract_train_s" not in second and "extract_val_s" not in second  # read back, not extracted again
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp
    assert second["top1"] == first["top1"] and second["top5"] == first["top5"]
    # another encoder over the same cache directory: its key differs, so the stale features are not reused
    torch.manual_seed(5)
    other = export_encoder(create_encoder("resnet18"), tmp_path / "o.safetensors", encoder_metadata("resnet18"))
    third = _cli(other, small, tmp_path / "c.json", "--cache-dir", str(cache))
    assert "extract_train_s" in third and "extract_val_s" in third


def test_saved_probe_scores_the_final_epoch_and_feeds_imagenet_c(small, checkpoint, tmp_path):
    """The reported top-1 is the final head's (recomputed here by a plain loop from the saved head), and
    imagenet_c --probe scores the same clean accuracy with that head instead of training one."""
    from safetensors.torch import load_file

    from supcon_scale.evaluation.robustness import generate_c, robustness_report

    head = tmp_path / "probe.safetensors"
    r = _cli(checkpoint, small, tmp_path / "r.json", "--save-probe", str(head), epochs=10, lr=2.0)
    assert r["top1"] > 0.4  # above chance (1/3), so a head from another epoch would score otherwise
    t = {k: v.double() for k, v in load_file(str(head)).items()}
    encoder, _ = encoder_from_export(checkpoint)
    vx, vy = _plain_features(encoder, small, "val")
    logits = ((torch.from_numpy(vx) - t["mean"]) / t["std"]) @ t["weight"].T + t["bias"]
    assert r["epochs"] == 10 and (logits.argmax(1).numpy() == vy).mean() == pytest.approx(r["top1"], abs=1e-6)
    c_root = tmp_path / "small-c"
    generate_c(small / "val", c_root, corruptions=["fog"], severities=[1], image_size=32, workers=1)
    report = robustness_report(
        {"m": checkpoint}, c_root, small, tmp_path / "out", "m", corruptions=["fog"], severities=[1],
        probes={"m": head},
    )  # fmt: skip
    assert report["models"]["m"]["linear"]["probe"] == str(head)
    assert report["models"]["m"]["clean_top1"] == pytest.approx(r["top1"], abs=1e-6)


def test_augment_trains_the_head_on_crop_flip_views(small, checkpoint, tmp_path, capsys):
    from supcon_scale.evaluation.linear import main

    plain = _cli(checkpoint, small, tmp_path / "p.json", "--save-probe", str(tmp_path / "p.safetensors"))
    aug = _cli(checkpoint, small, tmp_path / "a.json", "--augment", "--save-probe", str(tmp_path / "a.safetensors"))
    assert (plain["augment"], plain["stream"]) == (False, "cached")
    assert (aug["augment"], aug["stream"]) == (True, "crop_flip")
    from safetensors.torch import load_file

    w_plain = load_file(str(tmp_path / "p.safetensors"))["weight"]
    w_aug = load_file(str(tmp_path / "a.safetensors"))["weight"]
    assert not torch.allclose(w_plain, w_aug, atol=1e-4)  # other inputs, another head
    argv = ["--checkpoint", str(checkpoint), "--data", str(small), "--image-size", "32", "--preset", "fast"]
    assert main([*argv, "--augment"]) == 2
    assert "--augment" in capsys.readouterr().err


def test_keep_predictions_gives_each_val_image_right_or_wrong_in_folder_order(small, checkpoint):
    """The per-image correctness the demo's McNemar test pairs, recomputed by a plain loop from the trained head."""
    from supcon_scale.evaluation.linear import fit_linear_probe

    encoder, _ = encoder_from_export(checkpoint)
    probe, r = fit_linear_probe(encoder, small, image_size=32, preset="fast", keep_predictions=True)
    vx, vy = _plain_features(encoder, small, "val")
    with torch.no_grad():
        want = (probe.head(torch.from_numpy(vx).float()).argmax(1).numpy() == vy).tolist()
    assert r["val_correct"] == want and sum(want) == r["correct"] and len(want) == r["num_val"] == 18


@pytest.mark.parametrize("epochs", [1, 5])
def test_fast_epochs_are_reported_as_asked(small, checkpoint, tmp_path, capsys, epochs):
    """`--epochs N` on the L-BFGS preset runs N full-batch iterations and reports N epochs; the function evaluations
    (the first one and the line search's, once reported as the epochs: 5 became 6) are reported apart."""
    from supcon_scale.evaluation.linear import main

    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(checkpoint), "--data", str(small), "--image-size", "32", "--preset", "fast"]
    assert main([*argv, "--epochs", str(epochs), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["epochs"], r["max_epochs"]) == (epochs, epochs) and r["function_evaluations"] > epochs
    (row,) = [line for line in capsys.readouterr().out.splitlines() if " fast " in line]
    assert row.split("│")[5].strip() == str(epochs)  # the table's epochs column
