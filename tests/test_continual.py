"""Continual learning parts: reservoir memory, NCM, metrics, class-incremental streams, config errors, CIFAR."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from supcon_scale import recipes
from supcon_scale.config import ConfigError
from supcon_scale.continual import config as ccfg
from supcon_scale.continual import metrics
from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.continual.ncm import NearestClassMean, class_sums
from supcon_scale.continual.stream import ArraySource, build_stream, decode, load_sources
from supcon_scale.data.cifar import LAYOUTS, load_cifar
from supcon_scale.distributed import Context

# ---------------------------------------------------------------------------------------------------------------
# Reservoir memory


def _offer(memory: ReservoirMemory, ids: np.ndarray, batch: int) -> None:
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        memory.update(chunk, chunk % 7, np.zeros(len(chunk), dtype=np.int64), lambda k: int(k).to_bytes(4, "little"))


def test_reservoir_keeps_each_seen_sample_with_probability_m_over_n():
    """n = 60 samples into M = 12 slots, 4,000 seeds: each sample's inclusion frequency is M/n = 0.2.

    Tolerance: 4.5 binomial standard deviations, sqrt(0.2 * 0.8 / 4000) = 0.0063 -> 0.0285 per sample (the chance
    that any of the 60 frequencies leaves it by accident is about 4e-4; the seeds are fixed, so the test is
    deterministic). A chi-square over the 60 counts checks the spread as a whole (p > 1e-4).
    """
    from scipy import stats

    n, m, seeds = 60, 12, 4000
    counts = np.zeros(n)
    ids = np.arange(n, dtype=np.int64)
    for seed in range(seeds):
        memory = ReservoirMemory(m, seed)
        _offer(memory, ids, batch=1 + seed % 9)  # the batch split must not matter
        held = memory.index[: memory.filled]
        assert len(memory) == m and len(set(held.tolist())) == m  # M distinct samples
        counts[held] += 1
    freq = counts / seeds
    tolerance = 4.5 * math.sqrt(0.2 * 0.8 / seeds)
    assert np.abs(freq - m / n).max() < tolerance, (freq.min(), freq.max())
    expected = seeds * m / n
    chi2 = ((counts - expected) ** 2 / (expected * (1 - m / n))).sum()
    assert stats.chi2.sf(chi2, n - 1) > 1e-4


def test_reservoir_decisions_do_not_depend_on_the_batch_split():
    ids = np.arange(500, dtype=np.int64)
    runs = []
    for batch in (1, 10, 37, 500):
        memory = ReservoirMemory(50, seed=3)
        _offer(memory, ids, batch)
        runs.append((memory.index.copy(), memory.seen, memory.draw(20)))
    for index, seen, drawn in runs[1:]:
        assert np.array_equal(index, runs[0][0]) and seen == runs[0][1] and np.array_equal(drawn, runs[0][2])


def test_memory_shards_bytes_by_owner_and_round_trips_through_a_safe_checkpoint():
    """Two ranks' shards of one stream: the same slot table, disjoint bytes whose union is the one-rank memory;
    state_dict -> torch.save -> torch.load(weights_only=True) -> the same memory and the same future draws."""
    ids = np.arange(300, dtype=np.int64)
    encode = lambda k: f"img-{k}".encode() * (1 + int(k) % 5)  # noqa: E731 - bytes of varying length
    owners = np.arange(300) % 10 // 5  # batches of 10, rank r owns positions [5r, 5r+5)
    one = ReservoirMemory(40, seed=1)
    ranks = [ReservoirMemory(40, seed=1, rank=r, world_size=2) for r in range(2)]
    for i in range(0, 300, 10):
        one.update(ids[i : i + 10], ids[i : i + 10] % 3, np.zeros(10, dtype=np.int64), encode)
        for mem in ranks:
            mem.update(ids[i : i + 10], ids[i : i + 10] % 3, owners[i : i + 10], encode)
    assert all(np.array_equal(mem.index, one.index) for mem in ranks)
    assert set(ranks[0].data).isdisjoint(ranks[1].data)
    union = {**ranks[0].data, **ranks[1].data}
    assert union == one.data and all(union[s] == encode(one.index[s]) for s in union)

    buf = io.BytesIO()
    torch.save(ranks[1].state_dict(), buf)
    buf.seek(0)
    restored = ReservoirMemory(40, seed=99, rank=1, world_size=2)  # another seed: everything comes from the state
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.data == ranks[1].data and np.array_equal(restored.index, ranks[1].index)
    more = np.arange(300, 400, dtype=np.int64)
    for mem in (restored, ranks[1]):
        mem.update(more, more % 3, np.arange(100) % 2, encode)
    assert np.array_equal(restored.index, ranks[1].index) and restored.data == ranks[1].data
    assert np.array_equal(restored.draw(25), ranks[1].draw(25))
    with pytest.raises(ValueError, match="memory.size"):
        ReservoirMemory(41, seed=1, rank=1, world_size=2).load_state_dict(ranks[1].state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Nearest class mean


def test_ncm_matches_brute_force_nearest_normalised_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 12, generator=g) * torch.rand(90, 1, generator=g) * 5
    labels = torch.randint(0, 6, (90,), generator=g)
    labels[labels == 4] = 5  # class 4 has no memory sample: it must never be predicted
    queries = torch.randn(200, 12, generator=g)
    # two "ranks" summing their halves, as evaluation does
    s1, c1 = class_sums(feats[:40], labels[:40], 7)
    s2, c2 = class_sums(feats[40:], labels[40:], 7)
    pred = NearestClassMean(s1 + s2, c1 + c2).predict(queries)

    f = feats.double().numpy()
    q = queries.double().numpy()
    means = {}
    for c in range(7):
        rows = [f[i] / np.linalg.norm(f[i]) for i in range(len(f)) if labels[i] == c]
        if rows:
            mu = np.mean(rows, axis=0)
            means[c] = mu / np.linalg.norm(mu)
    expected = []
    for x in q:
        z = x / np.linalg.norm(x)
        expected.append(min(means, key=lambda c: float(np.sum((z - means[c]) ** 2))))
    assert pred.tolist() == expected
    assert 4 not in pred.tolist() and 6 not in pred.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_hand_computed_values():
    rows = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.9]]
    a = metrics.as_matrix(rows)
    assert metrics.stage_accuracy(a) == pytest.approx([0.9, 0.7, 0.7])
    assert metrics.final_average_accuracy(a) == pytest.approx(0.7)
    # forgetting: task 0 best 0.9 (stages 0, 1) -> 0.5: 0.4; task 1 best 0.8 -> 0.7: 0.1; mean 0.25
    assert metrics.average_forgetting(a) == pytest.approx(0.25)
    assert metrics.average_incremental_accuracy(a) == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    # a task that improves later is not "forgotten" below zero at its best, and the max excludes the last stage
    b = metrics.as_matrix([[0.2, None], [0.5, 0.9]])
    assert metrics.average_forgetting(b) == pytest.approx(-0.3)
    assert math.isnan(metrics.average_forgetting(metrics.as_matrix([[0.8]])))
    # 95% t-interval of [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, t(0.975, 2) = 4.302652729911275
    mean, half = metrics.t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="missing entry"):
        metrics.as_matrix([[0.5, None], [None, 0.4]])


# ---------------------------------------------------------------------------------------------------------------
# Streams and config


def _sources(classes: int = 10, per_class: int = 30, test_per_class: int = 5):
    rng = np.random.default_rng(0)

    def make(per):
        labels = np.repeat(np.arange(classes), per)
        return ArraySource(
            rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8), labels, [f"c{i}" for i in range(classes)]
        )

    return make(per_class), make(test_per_class)


def test_stream_splits_classes_into_disjoint_tasks_and_serves_each_sample_once_per_epoch():
    train, test = _sources()
    cfg = ccfg.load(None, ["stream.tasks=3", "stream.batch_size=7", "stream.epochs=2", "memory.size=10"])
    stream = build_stream(cfg, train, test, seed=5)
    assert [len(t) for t in stream.tasks] == [4, 3, 3]
    assert sorted(c for t in stream.tasks for c in t) == list(range(10))
    assert stream.tasks != [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # shuffled by the seed
    assert build_stream(cfg, train, test, seed=5).tasks == stream.tasks
    for t, classes in enumerate(stream.tasks):
        assert set(train.labels[stream.train_ids[t]]) == set(classes) == set(test.labels[stream.test_ids[t]])
    schedule = stream.schedule()
    assert len(schedule) == sum(2 * (len(ids) // 7) for ids in stream.train_ids)
    for t in range(3):
        for e in range(2):
            served = np.concatenate([stream.batch(t, e, b) for (tt, ee, b) in schedule if (tt, ee) == (t, e)])
            assert len(set(served.tolist())) == len(served) == len(stream.train_ids[t]) // 7 * 7
            assert set(served.tolist()) <= set(stream.train_ids[t].tolist())
    fixed = build_stream(ccfg.load(None, ["stream.tasks=3", "stream.shuffle_classes=false"]), train, test, 5)
    assert fixed.tasks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    named = build_stream(
        ccfg.load(None, ["stream.tasks=2", "stream.class_order=[c3, 1, c7, c0]", "memory.size=50"]), train, test, 5
    )
    assert named.tasks == [[3, 1], [7, 0]]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stream.tasks=11"], r"^stream.tasks=11 leaves 1 task\(s\) without classes"),
        (["stream.tasks=3", "stream.class_order=[c1, c2]"], r"^stream.tasks=3 leaves 1 task"),
        (["stream.class_order=[c1, nope, 42]"], r"^stream.class_order names unknown classes 'nope', 42"),
        (["memory.size=301"], r"^memory.size=301 is larger than the stream: it brings 300"),
        (["stream.tasks=10", "stream.batch_size=31"], r"^stream.batch_size=31 is larger than task 0's 30"),
    ],
)
def test_stream_refuses_impossible_splits_naming_the_key(overrides, match):
    train, test = _sources()
    cfg = ccfg.load(None, ["stream.batch_size=10", *overrides])
    with pytest.raises(ConfigError, match=match) as info:
        build_stream(cfg, train, test, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stream.taks=3"], r"unknown config key stream.taks \(did you mean stream.tasks\?\)"),
        (["stream.tasks=0"], r"stream.tasks must be >= 1"),
        (["memory.size=0"], r"memory.size must be >= 1"),
        (["methods=[scr, gem]"], r"methods\[1\] must be one of scr, er"),
        (["seeds=[1, 1]"], r"seeds must be distinct"),
        (["seeds=3"], r"seeds must be a list"),
        (["stream.class_order=[c1, c1]"], r"stream.class_order names a class twice"),
        (["engine.name=fsdp"], r"engine.name=fsdp: continual runs need replicated parameters"),
        (["train.resume=runs/x/checkpoints/step_00000010"], r"train.resume=.* names one run's checkpoint"),
        (["scr.temperature=0"], r"scr.temperature must be > 0"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ccfg.load(None, overrides)


def test_config_reads_lists_and_recipes(tmp_path):
    cfg = ccfg.load(None, ["seeds=[0, 1, 2]", "methods=[er]", "stream.class_order=null"])
    assert cfg.seeds == [0, 1, 2] and cfg.methods == ["er"] and cfg.stream.class_order is None
    with pytest.raises(ConfigError, match="not divisible by the world size 4"):
        ccfg.check(ccfg.load(None, ["stream.batch_size=10"]), 4)
    for recipe in [name for name in recipes.names() if name.startswith("continual/")]:
        loaded = ccfg.load(recipe)
        assert loaded.methods == ["scr", "er"], recipe
        ccfg.save(loaded, tmp_path / "again.yaml")
        assert ccfg.load(tmp_path / "again.yaml") == loaded


# ---------------------------------------------------------------------------------------------------------------
# CIFAR python archives


def write_fake_archive(root: Path, name: str, per_class_train: int, per_class_test: int) -> Path:
    """A tiny archive in the official layout and pickle format (protocol 2, bytes keys), random pixels."""
    directory, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
    num_classes = 10 if name == "cifar10" else 100
    out = root / directory
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for files, per in ((train_files, per_class_train), (test_files, per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), per))
        for part, chunk in zip(files, np.array_split(np.arange(len(labels)), len(files)), strict=True):
            data = rng.integers(0, 256, (len(chunk), 3072), dtype=np.uint8)
            with open(out / part, "wb") as f:
                pickle.dump({b"data": data, label_key.encode(): labels[chunk].tolist(), b"batch_label": b"x"}, f, 2)
    with open(out / meta_file, "wb") as f:
        pickle.dump({names_key.encode(): [f"class_{i:03d}".encode() for i in range(num_classes)]}, f, 2)
    return out


def test_cifar100_archive_streams_as_ten_tasks_and_memory_bytes_are_lossless(tmp_path):
    """`data.format: cifar` (the official python archive): 100 classes -> 10 tasks of 10, test split = test batch."""
    write_fake_archive(tmp_path, "cifar100", per_class_train=2, per_class_test=1)
    cfg = ccfg.load(None, ["data.format=cifar", f"data.root={tmp_path}", "stream.tasks=10", "memory.size=100"])
    train, test = load_sources(cfg, Context())
    assert len(train) == 200 and len(test) == 100 and train.classes[7] == "class_007"
    stream = build_stream(cfg, train, test, seed=0)
    assert [len(t) for t in stream.tasks] == [10] * 10 and all(len(ids) == 10 for ids in stream.test_ids)
    raw = load_cifar(tmp_path, "cifar100", "train")
    assert np.array_equal(np.asarray(decode(train.encoded(5))), raw.images[5])  # PNG: lossless
    assert np.array_equal(np.asarray(train.image(5)), raw.images[5])
