"""SupConLoss (dense and tiled) against a float64 brute force of Eq. 2 / Eq. 3 written out here (Khosla et al. 2020)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from supcon_scale.config import LossConfig
from supcon_scale.losses import SupConLoss, build


def brute_force(features, labels, tau, variant="out", contrast="all", scale=1.0):
    """Eq. 2 (out) / Eq. 3 (in) anchor by anchor with explicit exp and log; GenSCL weights for label vectors."""
    b, v, d = features.shape
    x = features.double().reshape(b * v, d)
    norm = x.norm(dim=1, keepdim=True)
    z = torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)
    m = b * v
    image = torch.arange(m) // v
    anchors = range(0, m, v) if contrast == "one" else range(m)
    losses = []
    for i in anchors:
        others = [j for j in range(m) if j != i]
        if labels is None:
            w = torch.tensor([1.0 if image[j] == image[i] else 0.0 for j in others], dtype=torch.float64)
        elif labels.ndim == 1:
            w = torch.tensor([1.0 if labels[image[j]] == labels[image[i]] else 0.0 for j in others],
                             dtype=torch.float64)
        else:
            y = labels.double()
            w = torch.stack([torch.nn.functional.cosine_similarity(y[image[i]], y[image[j]], dim=0) for j in others])
        if w.sum() <= 1e-9:
            continue
        e = torch.exp(torch.stack([z[i] @ z[j] for j in others]) / tau)
        denom = e.sum()
        if variant == "out":
            losses.append(-(w * torch.log(e / denom)).sum() / w.sum())
        else:
            losses.append(-torch.log((w * e).sum() / w.sum() / denom))
    if not losses:
        return features.sum() * 0.0
    return torch.stack(losses).mean() * scale


def make(b=6, v=2, d=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, v, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (b,), generator=g)
    return feats, labels


def value_and_grad(loss_fn, feats, labels):
    f = feats.clone().requires_grad_(True)
    out = loss_fn(f, labels)
    (grad,) = torch.autograd.grad(out, f)
    return out.detach(), grad


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


LABEL_KINDS = ["ints", "none", "onehot", "soft"]


def labels_of(kind, labels, classes=3, seed=1):
    if kind == "ints":
        return labels
    if kind == "none":
        return None
    onehot = torch.nn.functional.one_hot(labels, classes).double()
    if kind == "onehot":
        return onehot
    g = torch.Generator().manual_seed(seed)  # Mixup-like mixtures: lambda * y_i + (1 - lambda) * y_perm(i)
    lam = torch.rand(labels.shape[0], 1, generator=g, dtype=torch.float64)
    return lam * onehot + (1 - lam) * onehot[torch.randperm(labels.shape[0], generator=g)]


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("contrast", ["all", "one"])
def test_matches_brute_force_float64(impl, kind, variant, contrast):
    feats, ints = make(b=7, v=2, d=5, seed=hash((kind, variant, contrast)) % 1000)
    labels = labels_of(kind, ints)
    loss = SupConLoss(temperature=0.2, variant=variant, contrast=contrast, impl=impl, block_size=4)  # 14 % 4 != 0
    got, got_g = value_and_grad(loss, feats, labels)
    want, want_g = value_and_grad(lambda f, y: brute_force(f, y, 0.2, variant, contrast), feats, labels)
    assert rel_err(got, want) <= 1e-10
    assert rel_err(got_g, want_g) <= 1e-10


@pytest.mark.parametrize("scale,factor", [("none", 1.0), ("temperature", 0.1), ("base_temperature", 0.1 / 0.07)])
def test_scale_conventions(scale, factor):
    feats, labels = make()
    got = SupConLoss(temperature=0.1, scale=scale, base_temperature=0.07)(feats, labels)
    assert rel_err(got, brute_force(feats, labels, 0.1) * factor) <= 1e-12


def test_three_views_many_classes_and_few():
    for classes in (1, 2, 40):
        feats, labels = make(b=9, v=3, d=4, classes=classes, seed=classes)
        for impl in ("dense", "tiled"):
            got, got_g = value_and_grad(SupConLoss(impl=impl, block_size=7), feats, labels)
            want, want_g = value_and_grad(lambda f, y: brute_force(f, y, 0.1), feats, labels)
            assert rel_err(got, want) <= 1e-10 and rel_err(got_g, want_g) <= 1e-10


def test_onehot_vectors_equal_integer_labels_exactly():
    feats, labels = make(b=10, classes=4)
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    for impl in ("dense", "tiled"):
        loss = SupConLoss(impl=impl, block_size=6)
        a, ga = value_and_grad(loss, feats, labels)
        b, gb = value_and_grad(loss, feats, onehot)
        assert rel_err(a, b) <= 1e-13 and rel_err(ga, gb) <= 1e-13


def test_anchors_without_positives_are_left_out():
    feats, _ = make(b=6, v=1, d=4)
    labels = torch.tensor([0, 0, 1, 2, 3, 3])  # classes 1 and 2 appear once: their single view has no positive
    for impl in ("dense", "tiled"):
        got, grad = value_and_grad(SupConLoss(impl=impl, block_size=4), feats, labels)
        want, want_g = value_and_grad(lambda f, y: brute_force(f, y, 0.1), feats, labels)
        assert torch.isfinite(got) and rel_err(got, want) <= 1e-10 and rel_err(grad, want_g) <= 1e-10
        # Rows 2 and 3 still appear in the other anchors' denominators, so they get a gradient.
        assert grad[2].abs().sum() > 0


def test_no_positives_anywhere_gives_zero_not_nan():
    feats, _ = make(b=5, v=1, d=4)
    for impl in ("dense", "tiled"):
        got, grad = value_and_grad(SupConLoss(impl=impl), feats, torch.arange(5))
        assert got.item() == 0.0 and torch.all(grad == 0)


def test_single_class_batch():
    feats, _ = make(b=8, v=2, d=6)
    labels = torch.zeros(8, dtype=torch.long)
    for impl in ("dense", "tiled"):
        got, grad = value_and_grad(SupConLoss(impl=impl, block_size=5), feats, labels)
        want, want_g = value_and_grad(lambda f, y: brute_force(f, y, 0.1), feats, labels)
        assert rel_err(got, want) <= 1e-10 and rel_err(grad, want_g) <= 1e-10
        # All other embeddings are positives: L_i = LSE - mean = log(M - 1) when all logits are equal.
    same = torch.ones(4, 2, 3, dtype=torch.float64)
    assert abs(SupConLoss()(same, torch.zeros(4, dtype=torch.long)).item() - math.log(7)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_results(dtype):
    feats, labels = make(b=16, v=2, d=8, dtype=torch.float32)
    low = feats.to(dtype)
    for impl in ("dense", "tiled"):
        loss = SupConLoss(impl=impl, block_size=10)
        f = low.clone().requires_grad_(True)
        out = loss(f, labels)
        out.backward()
        assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(f.grad).all()
        assert f.grad.dtype == dtype
        want = brute_force(low.double(), labels, 0.1)  # the loss upcasts, so it matches the upcast inputs
        assert rel_err(out.double(), want) <= 1e-5


def test_autocast_bf16_computes_in_fp32():
    feats, labels = make(b=16, v=2, d=8, dtype=torch.float32)
    head = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(feats)
        assert z.dtype == torch.bfloat16
        out = SupConLoss()(z, labels)
    assert out.dtype == torch.float32
    want = brute_force(z.detach().double(), labels, 0.1)
    assert rel_err(out.detach().double(), want) <= 1e-5


def test_zero_norm_features_stay_finite():
    feats, labels = make(b=6, v=2, d=4)
    feats[1, 0] = 0.0
    feats[4] = 0.0
    for impl in ("dense", "tiled"):
        got, grad = value_and_grad(SupConLoss(impl=impl, block_size=5), feats, labels)
        want = brute_force(feats, labels, 0.1)
        assert torch.isfinite(got) and rel_err(got, want) <= 1e-10
        assert torch.isfinite(grad).all() and torch.all(grad[4] == 0) and torch.all(grad[1, 0] == 0)


def test_tiny_temperature_stays_finite_in_fp32():
    feats, labels = make(b=32, v=2, d=16, dtype=torch.float32)
    want = brute_force(feats.double(), labels, 0.01)
    for variant in ("out", "in"):
        want = brute_force(feats.double(), labels, 0.01, variant)
        for impl in ("dense", "tiled"):
            got, grad = value_and_grad(SupConLoss(0.01, variant=variant, impl=impl, block_size=24), feats, labels)
            assert torch.isfinite(got) and torch.isfinite(grad).all()
            assert rel_err(got.double(), want) <= 1e-5


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("variant", ["out", "in"])
def test_tiled_equals_dense_float32(kind, variant):
    feats, ints = make(b=150, v=2, d=32, classes=10, seed=3, dtype=torch.float32)  # M = 300, not a block multiple
    labels = labels_of(kind, ints, classes=10)
    labels = labels.float() if labels is not None and labels.ndim == 2 else labels
    dense = value_and_grad(SupConLoss(variant=variant, impl="dense"), feats, labels)
    tiled = value_and_grad(SupConLoss(variant=variant, impl="tiled", block_size=64), feats, labels)
    assert rel_err(tiled[0], dense[0]) <= 1e-5 and rel_err(tiled[1], dense[1]) <= 1e-5


def test_auto_picks_tiled_above_threshold_with_same_numbers():
    feats, labels = make(b=20, v=2, d=8)
    small = SupConLoss(impl="auto", auto_threshold=40 * 40)
    big = SupConLoss(impl="auto", auto_threshold=40 * 40 - 1, block_size=16)
    assert not small._use_tiled(40, 40) and big._use_tiled(40, 40)
    assert rel_err(big(feats, labels), small(feats, labels)) <= 1e-12


def test_build_from_config():
    cfg = LossConfig(name="supcon", temperature=0.2, variant="in", contrast="one", scale="temperature", impl="tiled")
    loss = build(cfg)
    assert loss.convention() == {
        "name": "supcon", "variant": "in", "contrast": "one", "scale": "temperature", "temperature": 0.2,
        "base_temperature": 0.07, "impl": "tiled",
    }
    json.dumps(loss.describe())
    feats, labels = make()
    simclr = build(LossConfig(name="simclr"))
    assert rel_err(simclr(feats, labels), brute_force(feats, None, 0.1)) <= 1e-12
    genscl = build(LossConfig(name="genscl"))
    soft = labels_of("soft", labels)
    assert rel_err(genscl(feats, soft), brute_force(feats, soft, 0.1)) <= 1e-12
    with pytest.raises(ValueError, match="loss.name"):
        build(LossConfig(name="cross_entropy"))


def test_user_mistakes_raise_value_error():
    feats, labels = make()
    with pytest.raises(ValueError, match="features"):
        SupConLoss()(feats[:, 0], labels)
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()(feats, labels[:3])
    with pytest.raises(ValueError, match="integers"):
        SupConLoss()(feats, labels.float())
    with pytest.raises(ValueError, match="loss.temperature"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="loss.variant"):
        SupConLoss(variant="mean")


def test_bench_loss_tool_smoke(tmp_path):
    """tools/bench_loss.py end to end at a tiny M (fresh subprocess per case); no timing assertions."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_loss.py"
    proc = subprocess.run(
        [sys.executable, str(tool), "--views", "64", "--dim", "8", "--impls", "tiled,dense,matmul,peer",
         "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["tiled", "dense", "matmul", "peer"]
    for r in rows:
        assert {"impl", "views", "dim", "device", "seconds", "peak_bytes", "baseline_bytes"} <= set(r)
        assert r["views"] == 64 and r["seconds"] > 0 and r["peak_bytes"] >= r["baseline_bytes"] > 0
    bad = subprocess.run([sys.executable, str(tool), "--impls", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--impls" in bad.stderr
