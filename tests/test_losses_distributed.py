"""Real gloo ranks each holding a slice of one global batch: the DDP average equals the single-process loss/gradient."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

from supcon_scale.losses import SupConLoss

CASES = [  # (impl, variant, contrast, label kind)
    ("dense", "out", "all", "ints"),
    ("tiled", "out", "all", "ints"),
    ("dense", "in", "one", "ints"),
    ("tiled", "in", "all", "soft"),
    ("tiled", "out", "one", "none"),
    ("dense", "out", "all", "soft"),
]


def global_batch(total: int, kind: str):
    g = torch.Generator().manual_seed(total)
    feats = torch.randn(total, 2, 6, generator=g, dtype=torch.float64)
    ints = torch.randint(0, 3, (total,), generator=g)
    ints[-1] = 7  # one class seen once: anchors without positives on the last rank
    if kind == "ints":
        return feats, ints
    if kind == "none":
        return feats, None
    onehot = torch.nn.functional.one_hot(ints, 8).double()
    lam = torch.rand(total, 1, generator=g, dtype=torch.float64)
    return feats, lam * onehot + (1 - lam) * onehot[torch.randperm(total, generator=g)]


def loss_and_grad(impl, variant, contrast, feats, labels):
    f = feats.clone().requires_grad_(True)
    loss = SupConLoss(temperature=0.2, variant=variant, contrast=contrast, impl=impl, block_size=3)(f, labels)
    loss.backward()
    return loss.item(), f.grad.tolist()  # plain lists: tensors over the queue need the sender alive until read


def rank_fn(rank: int, world: int, sizes: list[int]):
    """Every case on this rank's slice of the global batch; returns [(loss, grad)] per case."""
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = []
    for impl, variant, contrast, kind in CASES:
        feats, labels = global_batch(sum(sizes), kind)
        out.append(
            loss_and_grad(impl, variant, contrast, feats[start:end], None if labels is None else labels[start:end])
        )
    return out


@pytest.mark.parametrize("sizes", [[4, 4], [3, 5], [4, 4, 4], [2, 5, 3]], ids=["2even", "2uneven", "3even", "3uneven"])
def test_ranks_average_to_single_process(sizes):
    world = len(sizes)
    results = run_ranks(rank_fn, world, sizes)
    for i, (impl, variant, contrast, kind) in enumerate(CASES):
        feats, labels = global_batch(sum(sizes), kind)
        want_loss, want_grad = loss_and_grad(impl, variant, contrast, feats, labels)
        want_grad = torch.tensor(want_grad, dtype=torch.float64)
        losses = [results[r][i][0] for r in range(world)]
        assert abs(sum(losses) / world - want_loss) <= 1e-10 * abs(want_loss), (CASES[i], losses, want_loss)
        start = 0
        for r, n in enumerate(sizes):
            grad = torch.tensor(results[r][i][1], dtype=torch.float64) / world
            ref = want_grad[start : start + n]
            assert (grad - ref).abs().max() <= 1e-10 * want_grad.abs().max(), (CASES[i], r)
            start += n


OFFICIAL_CASES = [  # (impl, variant, denominator_mode, positives_cap): the official loss's options, gathered
    ("dense", "out", "one_positive", None),
    ("tiled", "in", "one_positive", 2),
    ("tiled", "out", "only_negatives", None),
    ("dense", "in", "only_negatives", 0),
    ("tiled", "out", "all", 2),
    ("dense", "in", "all", 4),
]


def official_loss_and_grad(case, feats, labels):
    impl, variant, mode, cap = case
    f = feats.clone().requires_grad_(True)
    loss = SupConLoss(0.2, variant, impl=impl, block_size=3, denominator_mode=mode, positives_cap=cap)(f, labels)
    loss.backward()
    return loss.item(), f.grad.tolist()


def official_rank_fn(rank: int, world: int, sizes: list[int]):
    """Every official case on this rank's slice; the cap keeps the first images of a label in the global order."""
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    feats, labels = global_batch(sum(sizes), "ints")
    return [official_loss_and_grad(case, feats[start:end], labels[start:end]) for case in OFFICIAL_CASES]


@pytest.mark.parametrize("sizes", [[5, 5], [3, 6]], ids=["2even", "2uneven"])
def test_official_options_on_two_ranks_equal_one_process(sizes):
    results = run_ranks(official_rank_fn, 2, sizes)
    feats, labels = global_batch(sum(sizes), "ints")
    for i, case in enumerate(OFFICIAL_CASES):
        want_loss, want_grad = official_loss_and_grad(case, feats, labels)
        want_grad = torch.tensor(want_grad, dtype=torch.float64)
        losses = [results[r][i][0] for r in range(2)]
        assert abs(sum(losses) / 2 - want_loss) <= 1e-10 * abs(want_loss), (case, losses, want_loss)
        got = torch.cat([torch.tensor(results[r][i][1], dtype=torch.float64) for r in range(2)]) / 2
        assert (got - want_grad).abs().max() <= 1e-10 * want_grad.abs().max(), case


SCALES = {"none": 1.0, "temperature": 0.2, "base_temperature": 0.2 / 0.07}  # x tau, x tau / base tau (0.07)


def scaled_rank_fn(rank: int, world: int, n: int):
    feats, labels = global_batch(n * world, "ints")
    out = {}
    for impl in ("dense", "tiled"):
        for scale in SCALES:
            f = feats[rank * n : (rank + 1) * n].clone().requires_grad_(True)
            loss = SupConLoss(temperature=0.2, scale=scale, impl=impl, block_size=3)(
                f, labels[rank * n : (rank + 1) * n]
            )
            loss.backward()
            out[impl, scale] = (loss.item(), f.grad.tolist())
    return out


def test_loss_scale_holds_across_ranks():
    """The recipes train with loss.scale=temperature on many GPUs: the factor must apply in a process group too."""
    n, world = 4, 2
    results = run_ranks(scaled_rank_fn, world, n)
    feats, labels = global_batch(n * world, "ints")
    for impl in ("dense", "tiled"):
        plain, plain_grad = loss_and_grad(impl, "out", "all", feats, labels)
        for scale, factor in SCALES.items():
            got = sum(results[r][impl, scale][0] for r in range(world)) / world
            assert got == pytest.approx(factor * plain, rel=1e-10), (impl, scale)
            grad = (
                torch.tensor([g for r in range(world) for g in results[r][impl, scale][1]], dtype=torch.float64) / world
            )
            torch.testing.assert_close(
                grad, factor * torch.tensor(plain_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12
            )
