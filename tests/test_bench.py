"""Smoke test of tools/bench_dataloader.py (tiny; no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supcon_scale.bench.loader import main, write_synthetic

REPO = Path(__file__).resolve().parents[1]


def test_synthetic_images_are_realistic_jpegs(tmp_path):
    root = write_synthetic(tmp_path, 4, classes=2)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 4
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (500, 375) and img.mode == "RGB"
        pixels = np.asarray(img, dtype=np.float64)
    # a photograph, not noise: neighbouring pixels are strongly correlated
    assert np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1] > 0.8


def test_bench_tool_runs_both_backends_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--synthetic",
            "8",
            "--synthetic-dir",
            str(tmp_path / "data"),
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--threads",
            "1",
            "--warmup",
            "1",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--profile",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["decode"]) for r in report["rows"]}
    assert rows == {("dali-cpu", "once"), ("dali-cpu", "roi"), ("torchvision", "pil")}
    for r in report["rows"]:
        assert r["images_per_s"] > 0 and abs(r["views_per_s"] - 2 * r["images_per_s"]) < 1e-6
        assert r["preset"] == "jitter_randaugment" and r["peak_rss_mib"] > 0
    assert [p["step"] for p in report["profile"]] == [
        "read",
        "ROI decodes+resize+flip+normalise",
        "+jitter",
        "+randaugment",
    ]


def test_tool_file_is_a_thin_entry_point():
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_dataloader.py"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0 and "--synthetic" in res.stdout
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_dataloader.py"), "--data", "/nonexistent/dir"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "directory not found" in bad.stdout


def test_train_bench_times_the_trainers_step_with_the_real_objective(monkeypatch):
    """bench/train.py runs `trainer.train_step` itself: cross-entropy on one view, SupCon on the config's views."""
    from supcon_scale import config, objectives, trainer
    from supcon_scale.bench import train as bench
    from supcon_scale.distributed import Context

    calls = []
    real_step = trainer.train_step

    def recording_step(engine, objective, views, labels):
        calls.append((type(objective), len(views), tuple(views[0].shape), objective.classifier_classes))
        return real_step(engine, objective, views, labels)

    monkeypatch.setattr(trainer, "train_step", recording_step)
    cfg = config.load(None, ["model.encoder=resnet18", "data.image_size=32", "precision=fp32", "data.views=2"])
    ce = bench.measure(cfg, Context(), 2, steps=1, warmup=1, loss_name="cross_entropy")
    supcon = bench.measure(cfg, Context(), 2, steps=2, warmup=0, loss_name="supcon")
    assert calls == [
        (objectives.CrossEntropyObjective, 1, (2, 3, 32, 32), bench.SYNTHETIC_CLASSES),
        (objectives.CrossEntropyObjective, 1, (2, 3, 32, 32), bench.SYNTHETIC_CLASSES),
        (objectives.ContrastiveObjective, 2, (2, 3, 32, 32), None),
        (objectives.ContrastiveObjective, 2, (2, 3, 32, 32), None),
    ]
    assert (ce["views"], supcon["views"]) == (1, 2)
    assert ce["views_per_s"] == ce["images_per_s"] and supcon["views_per_s"] == 2 * supcon["images_per_s"]


def test_augment_bench_writes_per_view_statistics_for_both_backends(tmp_path):
    from supcon_scale.bench import augment

    out = tmp_path / "augment.json"
    assert augment.main(["--views", "50", "--size", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 50 and result["machine"]["cores"] >= 1
    assert set(result["specs"]) == {
        "jitter_0.5", "jitter_1.0", "brightness_only", "contrast_only", "saturation_only", "hue_only", "autoaugment"
    }  # fmt: skip
    for name, spec in result["specs"].items():
        backends = {"torchvision", "dali", "dali_fused"} if name.startswith("jitter_") else {"torchvision", "dali"}
        assert set(spec["seconds"]) == backends
        for stat in augment.STATISTICS:
            assert set(spec[stat]) == backends | {"ks_vs_torchvision"}
            assert set(spec[stat]["ks_vs_torchvision"]) == backends - {"torchvision"}
            assert all(0 <= v <= 1 for v in spec[stat]["ks_vs_torchvision"].values())
            for b in backends:
                s = spec[stat][b]
                assert s["q05"] <= s["q25"] <= s["q50"] <= s["q75"] <= s["q95"] and s["std"] >= 0
    # Colour jitter alone keeps every pixel in place: no hue shift at all for brightness-only jitter.
    assert abs(result["specs"]["brightness_only"]["hue_shift"]["dali"]["mean"]) < 0.01
    policies = result["autoaugment_policies"]
    # DALI's ImageNet policy is TF Model Garden's v0 (the official run's); torchvision's is another table.
    assert policies["dali_imagenet"]["sub_policies_equal_to_tf_v0"] == 25
    assert policies["dali_imagenet"]["applications_per_image"] == policies["tf_v0"]["applications_per_image"]
    assert policies["torchvision_imagenet"]["ops_not_in_tf_v0"] == ["contrast", "sharpness"]


def test_ks_statistic_matches_scipy_and_bound_holds_for_one_distribution():
    from scipy.stats import ks_2samp

    from supcon_scale.bench.augment import ks_bound, ks_statistic

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.3, 1.0, size=200)
    assert abs(ks_statistic(a, b) - ks_2samp(a, b).statistic) < 1e-12
    same = [ks_statistic(rng.normal(size=300), rng.normal(size=300)) for _ in range(200)]
    assert np.mean(np.array(same) > ks_bound(300, 300, alpha=0.05)) < 0.12  # ~5% by construction


def _fake_run(arm: str, seed: int, right: int, extra: int = 0, n: int = 360) -> dict:
    """A finished run whose all-labels probe gets the first `right` val images, and `extra` more, right; its
    few-labels probe the same minus 100."""

    def probe(k: int) -> dict:
        correct = [i < k for i in range(n)]
        return {"top1": k / n, "correct": k, "num_val": n, "num_train": 1437, "val_correct": correct}

    return {"arm": arm, "seed": seed, "steps": 44, "probes": {"all": probe(right + extra), "few": probe(right - 100)}}


def test_small_batch_report_statistics_and_table_on_fake_runs():
    """bench/small_batch_report.py on made-up probe results (no training): pooled counts, the paired comparisons
    with plain (t over seeds by its formula), the verdicts, the step-cost medians, JSON and Markdown."""
    from scipy.stats import t

    from supcon_scale.bench import small_batch, small_batch_report

    seeds = (0, 1, 2)
    runs = [_fake_run("plain", s, 300) for s in seeds]
    runs += [_fake_run("queue", s, 300, extra=4 * (s + 1)) for s in seeds]  # +4, +8, +12 images: +2.2 points
    runs += [_fake_run("m_per_class", s, 300) for s in seeds]  # the same images right: no difference at all
    runs += [{"arm": "plain_256", "seed": s, "error": "exit 1: boom"} for s in seeds]
    cost = [{"plain": 1.0, "queue": 1.5}, {"plain": 2.0, "queue": 2.6}, {"plain": 1.0, "queue": 1.2}]
    arms = {a: small_batch.ARMS[a] for a in ("plain", "queue", "m_per_class", "plain_256")}
    body = small_batch_report.summarise(runs, arms, cost)
    plain, queue, mpc = (body["arms"][a] for a in ("plain", "queue", "m_per_class"))
    assert plain["all"]["pooled_correct"] == 900 and plain["all"]["pooled_n"] == 1080
    assert plain["all_vs_plain"] is None and body["arms"]["plain_256"]["failed"] == [0, 1, 2]
    c = queue["all_vs_plain"]
    diffs = [4 / 360, 8 / 360, 12 / 360]
    half = t.ppf(0.975, 2) * (4 / 360) / math.sqrt(3)  # stdev of 4, 8, 12 images is 4 images
    assert c["mean_difference"] == pytest.approx(8 / 360) and c["difference_per_seed"] == pytest.approx(diffs)
    assert c["seed_interval_95"] == pytest.approx((8 / 360 - half, 8 / 360 + half))
    assert (c["mcnemar"]["only_a"], c["mcnemar"]["only_b"]) == (24, 0) and c["mcnemar"]["p_value"] < 1e-6
    assert c["pooled_difference"] == pytest.approx(24 / 1080)
    # t over 3 seeds covers 0 (4.30 x 2.3 / 1.73 > 2.2 points) though McNemar is sure: within noise, conservatively
    assert c["seed_interval_95"][0] < 0 < c["pooled_interval_95"][0] and c["verdict"] == "within noise"
    assert mpc["few_vs_plain"]["mcnemar"]["p_value"] == 1.0 and mpc["few_vs_plain"]["within_noise"]
    assert body["step_cost"]["queue"]["ratio_to_plain"] == pytest.approx(1.3)
    assert body["step_cost"]["plain"]["median_step_s"] == 1.0
    setup = {"num_train": 1437, "num_val": 360, "base_lr": 3.0, "epochs": 2, "seeds": list(seeds), "probe": "fast",
             "labels_per_class": 5, "cost_repeats": 3, "cost_steps": 10}  # fmt: skip
    report = {"setup": setup, "machine": {"cpu": "test CPU", "cores": 2, "torch": "x"}, "summary": body}
    json.loads(json.dumps(report))
    table = small_batch_report.markdown(report).splitlines()
    rows = [line for line in table if line.startswith("| ") and "---" not in line]
    assert len(rows) == 5 and "test CPU (2 cores)" in table[0]
    assert rows[2].startswith("| + queue 1,024 (encoder keys) | 32 | 44 | 85.6 [83.3, 87.5] (n=1080) | +2.2 [")
    assert rows[2].endswith("within noise | 1.30x |") and "failed seeds: [0, 1, 2]" in rows[4]


def test_small_batch_options_are_checked(tmp_path, capsys):
    from supcon_scale.bench.small_batch import main

    for bad in (["--arms", "plain,nope"], ["--seeds", "0,x"], ["--epochs", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(tmp_path), *bad])
        assert exc.value.code == 2
    assert "--arms: unknown nope" in capsys.readouterr().err
