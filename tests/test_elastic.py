"""Issue 15: elastic resume (a 2-rank checkpoint continues on 3 ranks, then on 1) on every engine, the ZeRO optimizer
state re-partitioned on another world size, and the kNN monitor on every engine at 2 ranks.

Real gloo ranks (tests/multiproc.py). The images are uniform colours that code (class, item), so a hook reads each
sample's identity from the views the trainer trains on and the test counts them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from data_images import identities, write_coded
from multiproc import run_ranks

from supcon_scale import checkpoint, config, distributed, engines, export, models, trainer
from supcon_scale.evaluation.knn import knn_eval
from supcon_scale.hooks import Hook

os.environ.setdefault("DS_ACCELERATOR", "cpu")

CLASSES, PER_CLASS = 4, 9  # 36 images
GLOBAL_B = 6  # divisible by 1, 2 and 3 ranks; 6 steps per epoch
STEPS_PER_EPOCH, EPOCHS = 6, 2
TIMEOUT = 600  # seconds for one multi-rank phase (the CPU is shared)
ENGINES = [
    pytest.param("ddp", (), id="ddp"),
    pytest.param("fsdp", (), id="fsdp"),
    pytest.param("deepspeed", ("engine.zero_stage=1",), id="deepspeed-zero1"),
    pytest.param("deepspeed", ("engine.zero_stage=2",), id="deepspeed-zero2"),
]


@pytest.fixture(scope="module")
def coded_run_data(tmp_path_factory) -> Path:
    """`train/` of 36 coded images and a `val/` of 16 for the kNN monitor."""
    root = write_coded(tmp_path_factory.mktemp("elastic"), CLASSES, PER_CLASS)
    val = write_coded(tmp_path_factory.mktemp("elastic_val"), CLASSES, 4)
    shutil.move(str(val / "train"), str(root / "val"))
    return root


def _overrides(root: Path, out: Path, engine: str, *extra: str) -> list[str]:
    return [
        f"data.root={root}", f"out_dir={out}", f"engine.name={engine}", "model.encoder=resnet18", "model.feat_dim=16",
        "model.head=linear", f"data.global_batch_size={GLOBAL_B}", "data.image_size=16", "data.workers=0",
        "data.augment.preset=none", "data.augment.crop_scale=[1.0,1.0]", f"train.epochs={EPOCHS}",
        "train.warmup_epochs=0", "train.log_every=1", "train.progress=false", "train.resume=auto",
        "train.allow_changes=train.max_steps", *extra,
    ]  # fmt: skip


class SeenSamples(Hook):
    """Which (class, item) samples each step of this rank trains on, read from the pixels."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[tuple[int, int]]]] = []

    def on_batch(self, step: int, views: list[torch.Tensor], labels: torch.Tensor):
        self.rows.append((step, identities([v.cpu() for v in views], labels.cpu())))
        return views, labels


def _fit(rank: int, world: int, overrides: list[str]) -> list[tuple[int, list[tuple[int, int]]]]:
    ctx = distributed.init(seed=0)
    seen = SeenSamples()
    trainer.fit(config.load(None, overrides), ctx, hooks=[seen])
    return seen.rows


def _phases(root: Path, out: Path, engine: str, extra: tuple[str, ...], plan: list[tuple[int, str | None]]):
    """Run the phases (world size, max_steps override) in turn on one out_dir; {step: [samples of every rank]}."""
    seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for world, stop in plan:
        overrides = _overrides(root, out, engine, *extra, *([stop] if stop else []))
        for rows in run_ranks(_fit, world, overrides, timeout=TIMEOUT):
            for step, ids in rows:
                assert len(ids) == GLOBAL_B // world, (world, step, len(ids))  # the same global batch
                seen[step] += ids
    return seen


@pytest.fixture(scope="module")
def uninterrupted(coded_run_data: Path, tmp_path_factory) -> dict[int, list[tuple[int, int]]]:
    """One process, both epochs in one go: each step's global batch."""
    seen = _phases(coded_run_data, tmp_path_factory.mktemp("uninterrupted"), "ddp", (), [(1, None)])
    return {step: sorted(ids) for step, ids in seen.items()}


# make test keeps one ZeRO stage per test; the other runs in make test-slow (same code path, 30-50 s each)
@pytest.mark.parametrize("engine, extra", [*ENGINES[:2], pytest.param(*ENGINES[2].values, marks=pytest.mark.slow,
                                                                       id="deepspeed-zero1"), ENGINES[3]])  # fmt: skip
def test_two_ranks_resumed_on_three_then_one_see_every_sample_once_per_epoch(
    coded_run_data: Path, uninterrupted: dict, tmp_path: Path, engine: str, extra: tuple[str, ...]
):
    # 2 ranks stop mid-epoch 0 (step 2), 3 ranks go on past the epoch's end to mid-epoch 1 (step 8), 1 rank ends.
    plan = [(2, "train.max_steps=2"), (3, "train.max_steps=8"), (1, None)]
    seen = _phases(coded_run_data, tmp_path, engine, extra, plan)
    assert sorted(seen) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    every = Counter((k, i) for k in range(CLASSES) for i in range(PER_CLASS))
    for epoch in range(EPOCHS):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        assert Counter(s for step in steps for s in seen[step]) == every, epoch  # each sample exactly once
    # With per-sample augmentation seeds the resumed run trains on the global batches of the uninterrupted one.
    assert {step: sorted(ids) for step, ids in seen.items()} == uninterrupted
    meta = json.loads((checkpoint.latest(tmp_path) / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["engine"]) == (12, 1, engine)


# ---------------------------------------------------------------------------------------------------------------
# ZeRO 1-2: the optimizer state is re-partitioned, not only the model


def _zero_cfg(stage: int) -> config.RunConfig:
    from test_engines import tiny_cfg

    return tiny_cfg("deepspeed", f"engine.zero_stage={stage}")


def _zero_save(rank: int, world: int, stage: int, path: str) -> dict | None:
    """3 LARS steps on 2 ranks, save (rank 0), then a 4th step: its weights are what a resumed run must reach."""
    from test_engines import GLOBAL_B as B
    from test_engines import as_numpy, batch, local_views, step_once

    cfg = _zero_cfg(stage)
    ctx = distributed.Context(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(cfg.seed)
    engine = engines.build(
        engines.EngineSpec.from_run(cfg), ctx, models.build(cfg.model), total_steps=10, warmup_steps=0
    )
    engine.train(False)
    n = B // world
    for s in range(4):
        if s == 3:
            state = engine.state_dict()
            if rank == 0:
                torch.save(state, path)
        views, labels = batch(s, cfg.data.image_size)
        step_once(engine, local_views(views, rank, world), labels[rank * n : (rank + 1) * n])
    after = engine.state_dict()["model"]
    return as_numpy(after) if rank == 0 else None


def _zero_resume(rank: int, world: int, stage: int, path: str) -> dict | None:
    """Another world size loads the 2-rank state, saves it again unchanged, and takes the 4th step."""
    from test_engines import GLOBAL_B as B
    from test_engines import as_numpy, batch, local_views, step_once

    cfg = _zero_cfg(stage)
    ctx = distributed.Context(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(cfg.seed + 1)  # other initial weights: everything must come from the checkpoint
    engine = engines.build(
        engines.EngineSpec.from_run(cfg), ctx, models.build(cfg.model), total_steps=10, warmup_steps=0
    )
    engine.train(False)
    saved = torch.load(path, weights_only=True)
    engine.load_state_dict(saved)
    again = engine.state_dict()
    n = B // world
    views, labels = batch(3, cfg.data.image_size)
    step_once(engine, local_views(views, rank, world), labels[rank * n : (rank + 1) * n])
    after = engine.state_dict()["model"]
    if rank != 0:
        return None
    # numpy, not tensors: a tensor sent back through the queue lives in the exiting process's shared memory
    return {
        "saved": _numpy_tree(saved["optimizer"]),
        "again": _numpy_tree(again["optimizer"]),
        "after": as_numpy(after),
    }


def _numpy_tree(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numpy_tree(v) for v in obj]
    return obj


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])  # stage 2 in make test-slow
def test_zero_optimizer_state_repartitions_on_another_world_size(stage: int, tmp_path: Path):
    path = str(tmp_path / "state.pt")
    reference = run_ranks(_zero_save, 2, stage, path, timeout=TIMEOUT)[0]
    for world in (4, 1):
        got = run_ranks(_zero_resume, world, stage, path, timeout=TIMEOUT)[0]
        saved, again = got["saved"], got["again"]
        assert sorted(again["params"]) == sorted(saved["params"]) and again["scalars"] == saved["scalars"]
        for name, entry in saved["params"].items():
            assert sorted(again["params"][name]) == sorted(entry) and "momentum_buffer" in entry, name
            for key, value in entry.items():  # re-partitioned and gathered back bit for bit
                assert np.array_equal(again["params"][name][key], value), (world, name, key)
        for k, v in reference.items():  # the 4th step from the restored state is the 2-rank run's 4th step
            np.testing.assert_allclose(got["after"][k], v, rtol=1e-4, atol=1e-5, err_msg=f"{world} ranks: {k}")


# ---------------------------------------------------------------------------------------------------------------
# The kNN monitor on every engine


def _fit_knn(rank: int, world: int, overrides: list[str]) -> list[dict]:
    ctx = distributed.init(seed=0)
    trainer.fit(config.load(None, overrides), ctx)
    distributed.barrier()
    out = Path(config.load(None, overrides).out_dir)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []


@pytest.mark.parametrize("engine, extra", [ENGINES[0], ENGINES[1], pytest.param(*ENGINES[3].values,
                                                                                marks=pytest.mark.slow,
                                                                                id="deepspeed-zero2")])  # fmt: skip
def test_knn_monitor_on_two_ranks_matches_one_process(coded_run_data: Path, tmp_path: Path, engine: str, extra):
    overrides = _overrides(coded_run_data, tmp_path, engine, *extra, "train.epochs=1", "train.knn_every_epochs=1")
    rows = run_ranks(_fit_knn, 2, overrides, timeout=TIMEOUT)[0]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [STEPS_PER_EPOCH]
    # The monitor saw the weights of the last step, which the exported encoder holds: one process must agree.
    encoder, _ = export.encoder_from_export(tmp_path / "encoder.safetensors")
    want = knn_eval(encoder, coded_run_data / "train", coded_run_data / "val", image_size=16)
    assert knn[0]["knn_top1"] == pytest.approx(want["top1"], abs=1.5 / want["num_val"])
    assert knn[0]["knn_top5"] == pytest.approx(want["top5"], abs=1.5 / want["num_val"])
