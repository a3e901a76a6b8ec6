"""SupConLoss with a queue's keys against a float64 brute force over the concatenated contrast set, written here.

The contrast set is the batch's rows followed by the keys' (MoCo, He et al. 2020; PaCo, Cui et al. 2021); the
anchors are the batch's. The reference walks [anchors x (batch + keys)] with explicit sets, exp and log.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from supcon_scale.losses import SupConLoss


def queued_brute_force(
    features, labels, keys, key_labels, tau, variant="out", contrast="all", mode="all", cap=None, use_labels=True
):
    """Mean per-anchor loss over the anchors with a positive (and, for only_negatives, a negative).

    Sample s < B is the batch's image s, s >= B the queued sample s - B (its keys rows (s - B) * V ...). Positives of
    anchor (a, u): the other views of a, and every view of the first cap / V other samples of a's label in the order
    batch then queue (all without a cap); negatives: every view of another label. Without labels (SimCLR) every
    sample is its own label, queued ones included.
    """
    b, v, d = features.shape
    x = features.double().reshape(b * v, d)
    z = torch.cat([x / x.norm(dim=1, keepdim=True), keys.double()])
    n_keys = keys.shape[0] // v
    if labels is None or not use_labels:
        label = list(range(b + n_keys))
    else:
        queued = [("own", q) for q in range(n_keys)] if key_labels is None else [int(y) for y in key_labels]
        label = [int(y) for y in labels] + queued
    cols = range(z.shape[0])
    losses = []
    for i in range(0, b * v, v) if contrast == "one" else range(b * v):
        a = i // v
        same = [s for s in range(b + n_keys) if s != a and label[s] == label[a]]
        kept = set(same if cap is None else same[: cap // v]) | {a}
        positives = [j for j in cols if j != i and j // v in kept]
        negatives = [j for j in cols if label[j // v] != label[a]]
        if not positives or (mode == "only_negatives" and not negatives):
            continue
        e = {j: torch.exp(z[i] @ z[j] / tau) for j in positives + negatives}
        neg_sum = sum((e[j] for j in negatives), torch.zeros((), dtype=torch.float64))
        pos_sum = sum(e[j] for j in positives)
        den = {
            p: {"all": neg_sum + pos_sum, "one_positive": neg_sum + e[p], "only_negatives": neg_sum}[mode]
            for p in positives
        }
        if variant == "out":
            losses.append(-sum(torch.log(e[p] / den[p]) for p in positives) / len(positives))
        else:
            losses.append(-torch.log(sum(e[p] / den[p] for p in positives) / len(positives)))
    return torch.stack(losses).mean() if losses else features.sum() * 0.0


def make(b=5, v=2, d=4, queued=4, classes=3, seed=0):
    """Batch features [b, v, d] and labels, `queued` samples' unit keys [queued * v, d] and their labels."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (b,), generator=g)
    keys = torch.nn.functional.normalize(torch.randn(queued * v, d, generator=g, dtype=torch.float64), dim=1)
    key_labels = torch.randint(0, classes + 1, (queued,), generator=g)  # one label the batch may not have
    return feats, labels, keys, key_labels


def value_and_grad(fn, feats):
    f = feats.clone().requires_grad_(True)
    out = fn(f)
    (grad,) = torch.autograd.grad(out, f)
    return out.detach(), grad


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("variant", ["out", "in"])
@pytest.mark.parametrize("mode", ["all", "one_positive", "only_negatives"])
@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("kind", ["labels", "none", "unlabelled_keys"])
def test_queued_loss_matches_brute_force_float64(impl, variant, mode, cap, kind):
    feats, labels, keys, key_labels = make(seed=zlib.crc32(f"{impl}/{variant}/{mode}/{cap}/{kind}".encode()) % 997)
    labels = None if kind == "none" else labels
    key_labels = None if kind != "labels" else key_labels
    # 10 batch columns, 8 key columns, blocks of 3: tiles straddle rows and both column parts
    loss = SupConLoss(0.3, variant, impl=impl, block_size=3, denominator_mode=mode, positives_cap=cap)
    got, got_g = value_and_grad(lambda f: loss(f, labels, keys, key_labels), feats)
    want, want_g = value_and_grad(
        lambda f: queued_brute_force(f, labels, keys, key_labels, 0.3, variant, "all", mode, cap), feats
    )
    assert rel_err(got, want) <= 1e-10 and rel_err(got_g, want_g) <= 1e-10


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("variant", ["out", "in"])
def test_queued_loss_contrast_one_three_views_scale(impl, variant):
    """contrast=one, three views, scale=temperature: anchors view 0 only, the keys all views of their samples."""
    feats, labels, keys, key_labels = make(b=4, v=3, d=5, queued=3, seed=7)
    loss = SupConLoss(0.25, variant, "one", scale="temperature", impl=impl, block_size=4)
    got, got_g = value_and_grad(lambda f: loss(f, labels, keys, key_labels), feats)
    want, want_g = value_and_grad(
        lambda f: 0.25 * queued_brute_force(f, labels, keys, key_labels, 0.25, variant, "one"), feats
    )
    assert rel_err(got, want) <= 1e-10 and rel_err(got_g, want_g) <= 1e-10


def test_simclr_ignores_key_labels():
    """use_labels=False (loss.name=simclr): queued keys are only negatives, whatever labels come with them."""
    feats, labels, keys, key_labels = make(seed=3)
    loss = SupConLoss(0.2, use_labels=False)
    got = loss(feats, labels, keys, key_labels)
    want = queued_brute_force(feats, None, keys, None, 0.2)
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("mode", ["all", "one_positive"])
def test_no_keys_is_the_plain_loss_bit_for_bit(impl, mode):
    """keys=None and an empty queue (K = 0) give exactly the loss and gradient of the call without them."""
    feats, labels, keys, key_labels = make(b=6, seed=11)
    feats = feats.float()
    loss = SupConLoss(0.1, impl=impl, block_size=4, denominator_mode=mode)
    want, want_g = value_and_grad(lambda f: loss(f, labels), feats)
    for k, kl in ((None, None), (keys[:0].float(), key_labels[:0])):
        got, got_g = value_and_grad(lambda f, k=k, kl=kl: loss(f, labels, k, kl), feats)
        assert torch.equal(got, want) and torch.equal(got_g, want_g)


def test_tiled_does_not_build_gradients_for_keys():
    """The keys never take a gradient (a queue is a constant of the step)."""
    feats, labels, keys, key_labels = make(seed=5)
    keys = keys.clone().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    SupConLoss(0.2, impl="tiled", block_size=3)(f, labels, keys, key_labels).backward()
    assert keys.grad is None and f.grad is not None


def test_key_mistakes_raise_value_error():
    feats, labels, keys, key_labels = make(seed=2)
    loss = SupConLoss(0.2)
    with pytest.raises(ValueError, match="multiple of the 2 views"):
        loss(feats, labels, keys[:3], key_labels)
    with pytest.raises(ValueError, match="key_labels"):
        loss(feats, labels, keys, key_labels[:2])
    with pytest.raises(ValueError, match="label vectors"):
        loss(feats, torch.nn.functional.one_hot(labels, 3).double(), keys, key_labels)


def test_bench_loss_queue_case_in_process():
    """`tools/bench_loss.py --queue K`: one case in this process (the tool runs each in a fresh one), and K checked."""
    from supcon_scale.bench.loss import main, run_case

    for impl in ("tiled", "matmul"):
        row = run_case(impl, 16, 8, "cpu", 1, classes=3, queue=8)
        assert row["queue"] == 8 and row["seconds"] > 0 and row["peak_bytes"] >= row["baseline_bytes"]
    with pytest.raises(SystemExit):
        main(["--queue", "3"])
