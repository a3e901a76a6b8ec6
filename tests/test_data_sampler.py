"""`data.sampler=m_per_class` (issue 27 item 2): class-balanced global batches inside the epoch plan.

The expectations are the documented rules (supcon_scale/data/balanced.py), written out here: m images of each of
B/m distinct classes per global batch, no image twice in a batch; the epoch's steps those of the random sampler;
class appearances within one of each other (rounds over the classes); each image of a class used floor(m k / n) or
ceil(m k / n) times. The plan is computed per rank without processes; the loaders are read back through the pixels
of the coded images (tests/data_images.py).
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_images import coded_cfg, identities, write_coded

from supcon_scale import config
from supcon_scale.cli import main
from supcon_scale.config import AugmentConfig
from supcon_scale.data import build_train_loader
from supcon_scale.data.sharding import BalancedPlan, EpochPlan
from supcon_scale.distributed import Context

# Class sizes of an imbalanced label set: 28 samples, the smallest class 3.
SIZES = (3, 5, 8, 12)
LABELS = np.repeat(np.arange(len(SIZES)), SIZES)


def _global_batches(plan: BalancedPlan, seed: int, epoch: int, start: int = 0) -> list[list[int]]:
    """The global batches from step `start` on, put back together from every rank's batches (rank r holds the
    positions r, r + W, ... of each global batch)."""
    per_rank = [plan.batches(seed, epoch, r, start) for r in range(plan.world_size)]
    out = []
    for step in range(len(per_rank[0])):
        batch = [0] * plan.global_batch
        for r in range(plan.world_size):
            batch[r :: plan.world_size] = per_rank[r][step].tolist()
        out.append(batch)
    return out


def _assert_balanced(batch: list[int], labels: np.ndarray, m: int, global_batch: int) -> None:
    counts = Counter(int(labels[i]) for i in batch)
    assert len(batch) == global_batch and len(set(batch)) == len(batch), batch  # no image twice in a batch
    assert len(counts) == global_batch // m and set(counts.values()) == {m}, counts


@pytest.mark.parametrize("m,batch,drop_last", [(2, 4, True), (2, 6, False), (3, 9, True), (1, 4, True)])
def test_plan_batches_hold_m_of_each_of_b_over_m_distinct_classes(m: int, batch: int, drop_last: bool):
    plan = BalancedPlan(len(LABELS), batch, 1, drop_last, LABELS, m)
    steps = len(LABELS) // batch if drop_last else math.ceil(len(LABELS) / batch)
    assert plan.steps == steps == EpochPlan(len(LABELS), batch, 1, drop_last).steps  # the random epoch's steps
    for epoch in range(3):
        batches = _global_batches(plan, 7, epoch)
        assert len(batches) == steps
        for b in batches:
            _assert_balanced(b, LABELS, m, batch)
    assert _global_batches(plan, 7, 0) != _global_batches(plan, 7, 1)  # a new order each epoch


@pytest.mark.parametrize("drop_last", [True, False])
def test_each_class_and_image_is_used_as_documented_over_an_epoch(drop_last: bool):
    """m=2, B=4 (2 classes per batch) on classes of 3, 5, 8, 12 images: S steps give 2S class slots over 4 classes,
    each class in floor(2S/4) or ceil(2S/4) batches; a class in k batches uses 2k images, each floor(2k/n) or
    ceil(2k/n) times, exactly 2k mod n of them ceil times."""
    m, batch = 2, 4
    plan = BalancedPlan(len(LABELS), batch, 2, drop_last, LABELS, m)
    steps = 7  # 28 // 4 == ceil(28 / 4)
    for epoch in range(4):
        batches = _global_batches(plan, 1, epoch)
        appearances = Counter(int(LABELS[b[j]]) for b in batches for j in range(0, batch, m))
        slots = steps * batch // m
        assert sum(appearances.values()) == slots
        assert set(appearances.values()) <= {slots // len(SIZES), -(-slots // len(SIZES))}
        uses = Counter(i for b in batches for i in b)
        for c, n in enumerate(SIZES):
            k = appearances[c]
            mine = [uses[i] for i in np.flatnonzero(LABELS == c)]
            assert sum(mine) == m * k
            assert set(mine) <= {m * k // n, -(-m * k // n)}
            assert sum(u == -(-m * k // n) for u in mine) == (m * k % n or n)


@pytest.mark.parametrize("start", [0, 1, 3, 7])
def test_the_plan_is_the_same_on_1_2_3_ranks_and_after_a_mid_epoch_resume(start: int):
    """The global order is a function of (seed, epoch): every world size splits the same global batches, and a
    position saved at any step continues them on any world size (the position is global)."""
    labels = np.repeat(np.arange(6), [4, 5, 6, 7, 8, 9])  # 39 samples, B = 12: 3 steps with drop_last
    plans = {w: BalancedPlan(len(labels), 12, w, False, labels, 3) for w in (1, 2, 3)}
    reference = _global_batches(plans[1], 4, 2)
    assert len(reference) == 4 and reference == [plans[1].order(4, 2)[i : i + 12].tolist() for i in range(0, 48, 12)]
    for plan in plans.values():
        assert _global_batches(plan, 4, 2, start) == reference[start:]
        for b in _global_batches(plan, 4, 2, start):
            _assert_balanced(b, labels, 3, 12)
        # each sample's draw: its uses earlier in the epoch's global order, whichever rank served them
        flat = [i for b in reference for i in b]
        earlier = [flat[:p].count(i) for p, i in enumerate(flat)]
        for r in range(plan.world_size):
            mine = [earlier[12 * s + j] for s in range(start, len(reference)) for j in range(r, 12, plan.world_size)]
            assert np.concatenate(plan.draws(4, 2, r, start) or [[]]).tolist() == mine


def test_draws_count_the_earlier_uses_of_a_sample():
    plan = BalancedPlan(len(LABELS), 4, 1, True, LABELS, 2)
    seen: Counter[int] = Counter()
    for batch, draws in zip(plan.batches(0, 0, 0), plan.draws(0, 0, 0), strict=True):
        for i, d in zip(batch.tolist(), draws.tolist(), strict=True):
            assert d == seen[i]
            seen[i] += 1
    assert EpochPlan(len(LABELS), 4, 1, True).draws(0, 0, 0) is None  # the random order: every use is a first


def _imbalanced_coded(root: Path) -> Path:
    """The coded images, 4 classes of 10, with class 0 cut to 4 images (34 in all)."""
    write_coded(root)
    for extra in sorted((root / "train" / "c0").iterdir())[4:]:
        extra.unlink()
    return root


def test_torchvision_batches_are_balanced_and_an_epoch_uses_images_as_documented(tmp_path: Path):
    """B=4, m=2 on classes of 4, 10, 10, 10 images: 8 steps, 16 class slots, every class in 4 batches, so class 0
    (4 images) shows each image twice and the others 8 of their 10 images once."""
    root = _imbalanced_coded(tmp_path)
    cfg = coded_cfg(root, sampler="m_per_class", m_per_class=2, global_batch_size=4)
    loader = build_train_loader(cfg, Context(), seed=3, out_dir=None)
    loader.set_epoch(1)
    batches = [identities(v, lb) for v, lb in loader]
    assert len(batches) == loader.steps_per_epoch == 8
    for b in batches:
        assert len(set(b)) == 4 and sorted(Counter(label for label, _ in b).values()) == [2, 2]
    uses = Counter(c for b in batches for c in b)
    assert sorted(uses[0, i] for i in range(4)) == [2, 2, 2, 2]
    for c in (1, 2, 3):
        assert sorted(uses[c, i] for i in range(10)) == [0, 0] + [1] * 8
    # the served order is the plan's (pixels identify the file, the index names it)
    names = [loader.index.paths[i] for i in loader.plan.order(3, 1)]
    assert [(int(Path(p).parent.name[1:]), int(Path(p).stem)) for p in names] == [c for b in batches for c in b]


def test_a_repeated_image_gets_new_views():
    from supcon_scale.data.spec import spec_from_config
    from supcon_scale.data.torchvision import ViewsDataset

    class One:
        labels = [0]

        def image(self, i: int):
            from PIL import Image

            return Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))

    ds = ViewsDataset(One(), spec_from_config(AugmentConfig(preset="simclr"), 16), 2, seed=1)
    first, again, old_key = ds[0, 0, 0][0][0], ds[0, 0, 1][0][0], ds[0, 0][0][0]
    assert torch.equal(first, old_key) and not torch.equal(first, again)  # draw 0: the seeds of before


def test_torchvision_resume_mid_epoch_and_on_another_world_size_continues_the_order(coded: Path):
    cfg = coded_cfg(coded, sampler="m_per_class", m_per_class=2, global_batch_size=8)
    full = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    full.set_epoch(2)
    reference = [identities(v, lb) for v, lb in full]
    first = build_train_loader(cfg, Context(), seed=1, out_dir=None)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(2):
        next(it)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["sampler"] == "m_per_class=2"
    for world in (1, 2):  # saved by 2 ranks, continued by 1: the position is global
        resumed = build_train_loader(cfg, Context(), seed=1, out_dir=None)
        resumed.load_state_dict({**state, "world_size": world})
        resumed.set_epoch(2)
        assert [identities(v, lb) for v, lb in resumed] == reference[2:]
    random = build_train_loader(coded_cfg(coded, global_batch_size=8), Context(), seed=1, out_dir=None)
    with pytest.raises(ValueError, match="data.sampler m_per_class=2, this run has random"):
        random.load_state_dict(state)
    random.load_state_dict({**state, "batch": 0})  # at an epoch's start another sampler may take over


def test_dali_follows_the_same_plan(tmp_path: Path):
    """The DALI CPU pipeline serves the plan's order (one rank), and its feed gives rank 1 of 2 that rank's share."""
    pytest.importorskip("nvidia.dali")
    from supcon_scale.data.dali import PlanFeed

    root = _imbalanced_coded(tmp_path)
    cfg = coded_cfg(root, backend="dali-cpu", dali_threads=1, sampler="m_per_class", m_per_class=2, global_batch_size=4)
    loader = build_train_loader(cfg, Context(), seed=3, out_dir=None)
    loader.set_epoch(1)
    served = [c for v, lb in loader for c in identities(v, lb)]
    names = [loader.index.paths[i] for i in loader.plan.order(3, 1)]
    assert served == [(int(Path(p).parent.name[1:]), int(Path(p).stem)) for p in names]

    two = BalancedPlan(len(loader.index), 4, 2, True, np.asarray(loader.index.labels), 2)
    feed = PlanFeed(loader.index, two, 3, 1, 2, True, origin=two.steps)  # epoch 1 from its first step, ROI layout

    class Info:
        iteration = 0

    for step in range(two.steps):
        Info.iteration = step
        _, labels = feed(Info)
        expected = [loader.index.labels[i] for i in two.order(3, 1)[4 * step + 1 : 4 * step + 4 : 2]]
        assert labels[::2].tolist() == expected  # each sample twice (two ROI views)


def test_synthetic_labels_are_balanced_and_split_over_ranks():
    cfg = config.load(None, ["data.backend=synthetic", "data.global_batch_size=12", "data.image_size=8",
                             "data.num_classes=5", "data.sampler=m_per_class", "data.m_per_class=3"]).data  # fmt: skip

    def labels(rank: int, world: int) -> list[list[int]]:
        loader = build_train_loader(cfg, Context(rank=rank, world_size=world), seed=2, out_dir=None)
        loader.set_epoch(1)
        return [lb.tolist() for _, lb in loader]

    whole = labels(0, 1)
    assert len(whole) == 100
    counts = Counter()
    for batch in whole:
        assert sorted(Counter(batch).values()) == [3] * 4
        counts.update(set(batch))
    assert max(counts.values()) - min(counts.values()) <= 1  # rounds over the 5 classes
    split = [labels(r, 3) for r in range(3)]
    for step, batch in enumerate(whole):
        assert [split[r][step] for r in range(3)] == [batch[r::3] for r in range(3)]


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["data.global_batch_size=8", "data.m_per_class=3"], "data.m_per_class=3 does not divide"),
        (["data.global_batch_size=10", "data.m_per_class=5"], "data.m_per_class=5 exceeds the 4 image(s) of class 0"),
        (["data.global_batch_size=10", "data.m_per_class=2"], "= 5 classes per batch, but the training split has 4"),
    ],
    ids=["not-dividing", "above-smallest-class", "too-many-classes"],
)
def test_bad_sampler_input_is_one_line_naming_the_key_exit_2(tmp_path: Path, capsys, extra: list[str], message: str):
    root = _imbalanced_coded(tmp_path / "data")
    argv = ["train", "--config", "demo/digits", f"data.root={root}", f"out_dir={tmp_path / 'out'}", "data.workers=0",
            "data.backend=torchvision", "data.sampler=m_per_class", *extra]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_the_continual_run_has_no_sampler_to_set():
    """The continual run orders its stream itself (tasks, online batches): data.sampler is no key of its config."""
    from supcon_scale.continual import config as continual_config

    with pytest.raises(config.ConfigError, match="unknown config key data.sampler"):
        continual_config.load(None, ["data.sampler=m_per_class"])


def test_m_per_class_with_the_random_sampler_warns():
    with pytest.warns(UserWarning, match="data.m_per_class=8 does nothing with data.sampler=random"):
        config.check_run(config.load(None, ["data.m_per_class=8"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.check_run(config.load(None, []))
        config.check_run(config.load(None, ["data.sampler=m_per_class", "data.m_per_class=8"]))


@pytest.mark.slow  # three short runs; the loader's part is test_torchvision_resume_mid_epoch_and_on_another_world_size
def test_a_run_crashed_mid_epoch_resumes_the_balanced_order_exactly(small_digits: Path, tmp_path: Path):
    """trainer.fit with data.sampler=m_per_class, crashed after step 3 (checkpoint at step 2, mid-epoch: 7 steps per
    epoch) and resumed: the same weights, to the bit, as the uninterrupted run."""
    from safetensors.torch import load_file

    from supcon_scale import checkpoint, distributed, trainer
    from supcon_scale.hooks import Hook, StepInfo

    class Crash(Exception):
        pass

    class CrashAfter(Hook):
        def on_step(self, info: StepInfo) -> None:
            if info.step == 3:
                raise Crash

    def cfg(out: str, *extra: str) -> config.RunConfig:
        return config.load(
            "demo/digits",
            [f"data.root={small_digits}", f"out_dir={tmp_path / out}", "data.backend=torchvision", "data.workers=0",
             "data.image_size=16", "data.global_batch_size=32", "data.sampler=m_per_class", "data.m_per_class=4",
             "model.sync_bn=false", "model.encoder=test_resnet", "model.feat_dim=8", "train.max_steps=3",
             "train.checkpoint_every_steps=2", "train.progress=false", f"data.manifest={tmp_path / 'scan.tsv'}",
             *extra],
        )  # fmt: skip

    ctx = distributed.init(seed=0)
    trainer.fit(cfg("full"), ctx)
    with pytest.raises(Crash):
        trainer.fit(cfg("resumed"), ctx, hooks=[CrashAfter()])
    assert checkpoint.latest(tmp_path / "resumed").name == "step_00000002"
    distributed.seed_everything(9)
    trainer.fit(cfg("resumed", "train.resume=auto"), ctx)
    a = load_file(str(checkpoint.latest(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
