"""SupConLoss (dense and tiled) against a float64 brute force of Eq. 2 / Eq. 3 written out here (Khosla et al. 2020)."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

from supcon_scale.config import LossConfig
from supcon_scale.losses import SupConLoss
from supcon_scale.objectives.supcon import contrastive_loss as build


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
            w = torch.tensor(
                [1.0 if labels[image[j]] == labels[image[i]] else 0.0 for j in others], dtype=torch.float64
            )
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


def seed_of(*parts) -> int:
    """A stable seed per test case (hash() of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) % 1000


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
    feats, ints = make(b=7, v=2, d=5, seed=seed_of(kind, variant, contrast))
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
        "name": "supcon",
        "variant": "in",
        "contrast": "one",
        "scale": "temperature",
        "temperature": 0.2,
        "base_temperature": 0.07,
        "impl": "tiled",
        "denominator_mode": "all",
        "positives_cap": None,
    }
    official = build(LossConfig(denominator_mode="one_positive", positives_cap=2))
    assert official.convention()["denominator_mode"] == "one_positive" and official.convention()["positives_cap"] == 2
    assert json.loads(json.dumps(loss.convention())) == loss.convention()  # plain JSON: it goes into meta.json
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
        [
            sys.executable,
            str(tool),
            "--views",
            "64",
            "--dim",
            "8",
            "--impls",
            "tiled,dense,matmul,peer",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["tiled", "dense", "matmul", "peer"]
    for r in rows:
        assert {"impl", "views", "dim", "device", "seconds", "peak_bytes", "baseline_bytes"} <= set(r)
        assert r["views"] == 64 and r["seconds"] > 0 and r["peak_bytes"] >= r["baseline_bytes"] > 0
    bad = subprocess.run([sys.executable, str(tool), "--impls", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--impls" in bad.stderr


# --- the official loss's denominator_mode and positives_cap (google-research/supcon losses.py, contrastive_loss) ---


def official_brute_force(features, labels, tau, variant="out", contrast="all", mode="all", cap=None, normalize=True):
    """Per-anchor losses by the official definition, anchor by anchor with explicit sets, exp and log.

    Positives of anchor (a, u): the other views of image a, and every view of the first cap / V other images of a's
    label in batch order (all of them without a cap); negatives: every view of another label. Returns {anchor row:
    loss} for the anchors that have a positive (and, for only_negatives, a negative).
    """
    b, v, d = features.shape
    x = features.double().reshape(b * v, d)
    z = x / x.norm(dim=1, keepdim=True) if normalize else x
    label = list(range(b)) if labels is None else [int(y) for y in labels]
    out = {}
    for i in range(0, b * v, v) if contrast == "one" else range(b * v):
        a = i // v
        same_images = [s for s in range(b) if s != a and label[s] == label[a]]
        kept = set(same_images if cap is None else same_images[: cap // v]) | {a}
        positives = [j for j in range(b * v) if j != i and j // v in kept]
        negatives = [j for j in range(b * v) if label[j // v] != label[a]]
        if not positives or (mode == "only_negatives" and not negatives):
            continue
        e = {j: torch.exp(z[i] @ z[j] / tau) for j in positives + negatives}
        neg_sum = sum((e[j] for j in negatives), torch.zeros((), dtype=torch.float64))
        pos_sum = sum(e[j] for j in positives)
        if mode == "all":
            den = {p: neg_sum + pos_sum for p in positives}
        elif mode == "one_positive":
            den = {p: neg_sum + e[p] for p in positives}
        else:
            den = {p: neg_sum for p in positives}
        if variant == "out":
            out[i] = -sum(torch.log(e[p] / den[p]) for p in positives) / len(positives)
        else:
            out[i] = -torch.log(sum(e[p] / den[p] for p in positives) / len(positives))
    return out


def official_mean(features, labels, tau, *args, **kwargs):
    rows = official_brute_force(features, labels, tau, *args, **kwargs)
    return torch.stack(list(rows.values())).mean() if rows else features.sum() * 0.0


# The official losses_test.py cases (testLossForSummationLocationsAndDenominatorModes): raw features, tau = 1,
# per-image loss = the mean over its two views; "hand-checked" values of the release.
OFFICIAL_FEATURES = [
    [[0.01, 0.02, 0.14], [0.38, 0.61, 0.50]],
    [[0.86, 0.97, 0.33], [0.26, 0.68, 0.45]],
    [[0.32, 0.64, 0.28], [0.45, 0.74, 0.73]],
]
OFFICIAL_CASES = [  # (variant, mode, cap, labels, per-image losses)
    ("out", "all", None, (0, 0, 1), [1.6755852, 1.7973773, 1.58471]),
    ("out", "one_positive", None, (0, 0, 1), [1.1782627, 1.3435497, 1.58471]),
    ("out", "only_negatives", None, (0, 0, 1), [0.79652834, 1.0154991, 1.3529458]),
    ("out", "all", 4, (0, 0, 1), [1.6755852, 1.7973773, 1.58471]),
    ("out", "all", 2, (0, 0, 0), [1.1385298, 1.1824025, 1.1557417]),
    ("out", "all", 0, (0, 0, 1), [1.3769293, 1.0785717, 1.58471]),
    ("in", "all", None, (0, 0, 1), [1.6356678, 1.7135872, 1.58471]),
    ("in", "one_positive", None, (0, 0, 1), [1.1571673, 1.2941568, 1.58471]),
    ("in", "only_negatives", None, (0, 0, 1), [0.756611, 0.93170905, 1.3529458]),
    ("in", "all", 4, (0, 0, 1), [1.6356678, 1.7135872, 1.58471]),
    ("in", "all", 2, (0, 0, 0), [1.0986123, 1.0986123, 1.0986123]),
    ("in", "all", 0, (0, 0, 1), [1.3769293, 1.0785717, 1.58471]),
]


@pytest.mark.parametrize("variant,mode,cap,labels,expected", OFFICIAL_CASES)
def test_brute_force_reproduces_the_official_values(variant, mode, cap, labels, expected):
    """The reference below is the official loss: its own test values, from its raw (unnormalised) features."""
    feats = torch.tensor(OFFICIAL_FEATURES, dtype=torch.float64)
    rows = official_brute_force(feats, torch.tensor(labels), 1.0, variant, mode=mode, cap=cap, normalize=False)
    per_image = [(rows[2 * s] + rows[2 * s + 1]).item() / 2 for s in range(3)]
    assert per_image == pytest.approx(expected, abs=1e-6)


def test_defaults_are_the_official_all_without_cap():
    feats, labels = make(b=8, v=2, d=5, seed=5)
    for variant in ("out", "in"):
        assert rel_err(official_mean(feats, labels, 0.1, variant), brute_force(feats, labels, 0.1, variant)) <= 1e-13


MODES = ["all", "one_positive", "only_negatives"]


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [None, 0, 2, 4])
@pytest.mark.parametrize("contrast", ["all", "one"])
def test_official_options_match_brute_force_float64(impl, variant, mode, cap, contrast):
    feats, labels = make(b=9, v=2, d=5, classes=3, seed=seed_of(impl, variant, mode, cap, contrast))
    loss = SupConLoss(0.2, variant, contrast, impl=impl, block_size=5, denominator_mode=mode, positives_cap=cap)
    got, got_g = value_and_grad(loss, feats, labels)
    want, want_g = value_and_grad(lambda f, y: official_mean(f, y, 0.2, variant, contrast, mode, cap), feats, labels)
    assert rel_err(got, want) <= 1e-10 and rel_err(got_g, want_g) <= 1e-10


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("mode", MODES)
def test_official_options_three_views_simclr_and_singletons(impl, mode):
    """Three views (cap a multiple of 3), SimCLR (no labels: the cap never binds), classes seen once."""
    feats, _ = make(b=7, v=3, d=4, seed=seed_of("three", impl, mode))
    singles = torch.tensor([0, 0, 0, 0, 1, 2, 2])  # label 1 has one image: its views' positives are each other
    for labels, cap in ((singles, 3), (singles, None), (None, 3), (None, None)):
        for variant in ("out", "in"):
            loss = SupConLoss(0.3, variant, impl=impl, block_size=4, denominator_mode=mode, positives_cap=cap)
            got, got_g = value_and_grad(loss, feats, labels)
            ref = lambda f, y, variant=variant, cap=cap: official_mean(f, y, 0.3, variant, "all", mode, cap)  # noqa: E731
            want, want_g = value_and_grad(ref, feats, labels)
            assert rel_err(got, want) <= 1e-10 and rel_err(got_g, want_g) <= 1e-10, (labels, cap, variant)


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_official_options_one_label_batch(impl):
    """No negatives at all: only_negatives leaves every anchor out (0, not inf); one_positive's ratios are all 1."""
    feats, _ = make(b=5, v=2, d=4, seed=11)
    labels = torch.zeros(5, dtype=torch.long)
    for variant in ("out", "in"):
        none = SupConLoss(impl=impl, variant=variant, block_size=3, denominator_mode="only_negatives")
        got, grad = value_and_grad(none, feats, labels)
        assert got.item() == 0.0 and torch.all(grad == 0)
        for cap in (None, 2):
            one = SupConLoss(
                impl=impl, variant=variant, block_size=3, denominator_mode="one_positive", positives_cap=cap
            )
            got, grad = value_and_grad(one, feats, labels)
            want = official_mean(feats, labels, 0.1, variant, mode="one_positive", cap=cap)
            assert torch.isfinite(grad).all() and abs(got.item() - want.item()) <= 1e-12 and abs(want.item()) < 1e-12


def test_positives_cap_keeps_the_first_images_in_batch_order():
    """One label, cap of one other image (two views): image 0 keeps image 1, every later image keeps image 0. So
    image 3 is in no other anchor's row, and its gradient is that of its own two rows, written out here."""
    feats, _ = make(b=4, v=2, d=4, seed=2)
    labels = torch.zeros(4, dtype=torch.long)
    x = feats.clone().requires_grad_(True)
    z = x / x.norm(dim=2, keepdim=True)
    own = 0.0
    for u in (0, 1):  # anchor (3, u): positives (3, 1 - u), (0, 0), (0, 1); the denominator holds exactly those
        s = torch.stack([z[3, u] @ z[3, 1 - u], z[3, u] @ z[0, 0], z[3, u] @ z[0, 1]]) / 0.5
        own = own + (torch.logsumexp(s, 0) - s.mean()) / 8  # 8 anchors in the mean
    (want,) = torch.autograd.grad(own, x)
    for impl in ("dense", "tiled"):
        _, got = value_and_grad(SupConLoss(0.5, impl=impl, block_size=3, positives_cap=2), feats, labels)
        assert rel_err(got[3], want[3]) <= 1e-12, impl


def near_duplicate_negatives(b=16, v=2, d=16, seed=0):
    """Images 0 and 1 (different labels) nearly equal: for those anchors a negative sits far above the positives'
    log-sum-exp at small tau (exp(s - LSE_P) overflows fp32 there), the case that broke the tiled L_in backward."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, v, d, generator=g)
    feats[1] = feats[0] + 0.01 * torch.randn(v, d, generator=g)
    labels = torch.arange(b) % 4
    labels[1] = 1
    return feats, labels


@pytest.mark.parametrize("tau", [0.05, 0.01, 0.005])
@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("mode,cap", [("all", None), ("all", 2), ("one_positive", None), ("only_negatives", None)])
def test_small_temperature_fp32_matches_float64_dense(tau, variant, mode, cap):
    feats, labels = near_duplicate_negatives(seed=seed_of(tau, variant, mode, cap))
    kw = dict(variant=variant, denominator_mode=mode, positives_cap=cap)
    want, want_g = value_and_grad(SupConLoss(tau, impl="dense", **kw), feats.double(), labels)
    ref = official_mean(feats.double(), labels, tau, variant, mode=mode, cap=cap)  # exp(1 / 0.005) fits float64
    assert rel_err(want, ref) <= 1e-10
    for impl in ("dense", "tiled", "auto"):
        loss = SupConLoss(tau, impl=impl, block_size=12, auto_threshold=0, **kw)
        got, got_g = value_and_grad(loss, feats, labels)
        assert torch.isfinite(got) and torch.isfinite(got_g).all(), impl
        assert rel_err(got.double(), want) <= 1e-5 and rel_err(got_g.double(), want_g) <= 1e-4, impl


def test_official_option_mistakes_raise_value_error():
    feats, labels = make(b=6, v=2)
    soft = labels_of("soft", labels)
    with pytest.raises(ValueError, match="loss.denominator_mode"):
        SupConLoss(denominator_mode="one_positive")(feats, soft)  # label vectors have no hard negatives
    with pytest.raises(ValueError, match="loss.positives_cap"):
        SupConLoss(positives_cap=3)(feats, labels)  # not a multiple of the 2 views
    with pytest.raises(ValueError, match="loss.positives_cap"):
        SupConLoss(positives_cap=-1)
    with pytest.raises(ValueError, match="loss.denominator_mode"):
        SupConLoss(denominator_mode="none")
    with pytest.raises(ValueError, match="^block_size must be >= 1"):  # an argument, not a config key
        SupConLoss(block_size=0)
