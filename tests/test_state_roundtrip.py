"""Every stateful part of a run round-trips through a real checkpoint (issue 28 item 2).

One run is built as `trainer.fit` builds it (torchvision loader, GenSCL with Mixup and CutMix, fp16 with loss scaling,
LARS under a fractional warm-up), trained two steps into an epoch of five, the first step's loss scaled until the
fp16 gradients overflow (so the scaler has backed off and skipped a step), and saved by the real `Checkpointer`.
A second run, built afresh (step 0's weights, the seed's streams), resumes from it. Each part's state must
be non-trivial before the save (else the check would pass on a part that is never restored), differ in the fresh
run before the resume, and equal the saved one after.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from data_images import write_noise

from supcon_scale import checkpoint, config, engines, models, objectives, trainer
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context, seed_everything
from supcon_scale.engines import EngineSpec

CTX = Context(rank=0, world_size=1, local_rank=0)
INIT_SCALE = torch.amp.GradScaler("cpu").get_scale()


class Run:
    """The stateful parts of one run, built in trainer.fit's order."""

    def __init__(self, cfg: config.RunConfig):
        self.loader = build_train_loader(cfg.data, CTX, cfg.seed, Path(cfg.out_dir))
        self.objective = objectives.build(cfg, self.loader.num_classes, CTX)
        seed_everything(cfg.seed)
        model = models.build(cfg.model, self.objective.classifier_classes, cfg.data.image_size)
        total, warmup = trainer.schedule_steps(cfg.train, self.loader.steps_per_epoch)
        self.engine = engines.build(EngineSpec.from_run(cfg), CTX, model, total, warmup)
        self.checkpointer = checkpoint.Checkpointer(cfg, CTX, self.engine, self.loader, self.objective, [])


# Each stateful part: how to read its state from a Run. A part missing here fails `test_every_part_is_listed`.
PARTS: dict[str, Callable[[Run], Any]] = {
    "engine.model": lambda run: run.engine.state_dict()["model"],
    "engine.optimizer": lambda run: run.engine.state_dict()["optimizer"],
    "engine.scheduler": lambda run: run.engine.state_dict()["scheduler"],
    "engine.scaler": lambda run: run.engine.state_dict()["scaler"],
    "loader.position": lambda run: run.loader.state_dict(),
    "objective.rank_state": lambda run: run.objective.rank_state(),  # GenSCL's Mixup/CutMix generator
    "rng": lambda run: checkpoint.rng_state(),  # torch, numpy and Python: augmentations drawn in the process
}


# What makes each state non-trivial in this run (the check must fail if the part were not restored).
def _nontrivial(part: str, state: Any, steps: int) -> bool:
    if part == "engine.scaler":
        return state["scale"] < INIT_SCALE  # backed off after the overflow
    if part == "engine.scheduler":
        return 0 < state["last_epoch"] < steps  # stepped, but not on the overflowed step
    if part == "engine.optimizer":
        return any(len(s) for s in state["state"].values())  # momentum buffers
    if part == "loader.position":
        return 0 < state["batch"] < 5  # mid-epoch
    if part == "objective.rank_state":
        return "mixer" in state  # moved on from its seed: the fresh run's differs (test_state_roundtrips)
    return True


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested states (tensors compared by value, dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.equal(b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _cfg(root: Path, out_dir: Path, resume: str | None) -> config.RunConfig:
    return config.load(
        None,
        [
            f"data.root={root}",
            f"out_dir={out_dir}",
            f"train.resume={'null' if resume is None else resume}",
            "data.global_batch_size=4",
            "data.image_size=16",
            "data.workers=0",
            "model.encoder=test_resnet",
            "model.feat_dim=8",
            "precision=fp16",
            "loss.name=genscl",
            "mix.mixup_alpha=1.0",
            "mix.cutmix_alpha=1.0",
            "train.epochs=2",
            "train.warmup_epochs=0.5",
            "train.progress=false",
        ],
    )


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> dict[str, tuple[Any, Any, Any]]:
    """{part: (state before the save, the fresh run's state before its resume, the state after the resume)}."""
    base = tmp_path_factory.mktemp("roundtrip")
    root = write_noise(base / "data", classes=2, per_class=10, seed=0)  # 20 images: 5 steps of 4
    out_dir = base / "run"
    run = Run(_cfg(root, out_dir, resume=None))
    step, epoch = run.checkpointer.resume()
    run.engine.train()
    steps = 4  # of 5: mid-epoch; fp16 at the initial scale overflows more than the forced first step here
    for step, (views, labels) in enumerate(run.loader, start=1):
        with run.engine.autocast():
            views, targets = run.objective.prepare(views, labels)
            out = run.engine(torch.cat(views))
        loss = run.objective(objectives.per_sample(out, len(views)), targets)
        run.engine.backward(loss * (1e38 if step == 1 else 1.0))  # the first step overflows the fp16 gradients
        run.engine.step()
        torch.rand(3), np.random.rand(3), random.random()  # every stream moves on
        if step == steps:
            break
    before = {part: copy.deepcopy(read(run)) for part, read in PARTS.items()}
    run.checkpointer.save(step, epoch)
    run.checkpointer.release()
    fresh = Run(_cfg(root, out_dir, resume="auto"))  # the initial weights and streams: step 0's
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    fresh_states = {part: copy.deepcopy(read(fresh)) for part, read in PARTS.items()}
    assert fresh.checkpointer.resume() == (steps, 0)
    fresh.checkpointer.release()
    after = {part: read(fresh) for part, read in PARTS.items()}
    saved = {part: (before[part], fresh_states[part], after[part], steps) for part in PARTS}
    return {**saved, "checkpoint": checkpoint.latest(out_dir)}


# The checkpoint's files by what they hold: checkpoint.load's engine state and this rank's state.
FILE_PARTS = {"data": "loader.position", "objective": "objective.rank_state", "rng": "rng"}


def test_every_part_is_listed(states: dict) -> None:
    """Whatever the checkpoint holds, PARTS checks: a new stateful part saved there must be added to PARTS."""
    _, engine_state, rank_state = checkpoint.load(states["checkpoint"])
    held = {f"engine.{k}" for k in engine_state} | {FILE_PARTS.get(k, k) for k in rank_state}
    assert held == set(PARTS)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_state_roundtrips(part: str, states: dict) -> None:
    before, fresh, after, steps = states[part]
    assert _nontrivial(part, before, steps), f"{part}: its state is trivial in this run: {before}"
    assert not same(before, fresh), f"{part}: a fresh run already has the saved state; the check would prove nothing"
    assert same(before, after), f"{part}: the state after the resume differs from the one saved"
