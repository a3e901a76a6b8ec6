"""Streams, boundaries and uneven shares (issue 28 item 4), single-process parts: per-rank and per-epoch random
streams, replay draws without replacement, the warm-up/cosine schedule at fractional and one-step boundaries, a
one-step profile range. The sharded evaluations on uneven shares are in tests/test_evaluation_shares.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from data_images import write_noise
from scipy import stats

from supcon_scale import config, objectives, optim, trainer
from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.data import build_train_loader
from supcon_scale.data.synthetic import SyntheticLoader
from supcon_scale.distributed import Context
from supcon_scale.hooks import StepInfo
from supcon_scale.profiling import Profiler


def ctx(rank: int, world: int = 2) -> Context:
    return Context(rank=rank, world_size=world, local_rank=rank)


def _mixed(objective: objectives.Objective) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)]
    mixed, (vectors, _) = objective.prepare(views, torch.tensor([0, 1, 2, 0, 1, 2]))
    return torch.cat([torch.stack(mixed).flatten(), vectors.flatten()])


GENSCL = ["loss.name=genscl", "mix.mixup_alpha=1.0", "mix.cutmix_alpha=1.0"]


def test_ranks_draw_different_mixing_streams_and_the_same_after_resume() -> None:
    """Each rank mixes with its own stream; a rank's stream continues exactly from its saved state."""
    cfg = config.load(None, GENSCL)
    by_rank = [objectives.build(cfg, 3, ctx(r)) for r in (0, 1)]
    assert not torch.equal(_mixed(by_rank[0]), _mixed(by_rank[1]))
    assert torch.equal(_mixed(objectives.build(cfg, 3, ctx(1))), _mixed(objectives.build(cfg, 3, ctx(1, 4))))
    saved = {k: v.clone() for k, v in by_rank[1].rank_state().items()}
    expected = _mixed(by_rank[1])
    resumed = objectives.build(cfg, 3, ctx(1))
    resumed.load_rank_state(saved)
    assert torch.equal(_mixed(resumed), expected)


def test_ranks_draw_different_synthetic_batches() -> None:
    cfg = config.load(None, ["data.backend=synthetic", "data.global_batch_size=4", "data.image_size=8"]).data
    first = [next(iter(SyntheticLoader(cfg, ctx(r), seed=0)))[0][0] for r in (0, 1)]
    assert not torch.equal(first[0], first[1])


def test_epochs_draw_different_views(tmp_path) -> None:
    """The same image gets other views in another epoch (a per-sample seed that ignores the epoch fails), and the
    same views when the epoch is served again."""
    root = write_noise(tmp_path, classes=2, per_class=4, seed=0)
    cfg = config.load(None, [f"data.root={root}", "data.global_batch_size=8", "data.image_size=12", "data.workers=0"])
    loader = build_train_loader(cfg.data, ctx(0, 1), cfg.seed, None)

    def views_by_sample(epoch: int) -> dict[int, torch.Tensor]:
        loader.set_epoch(epoch)
        views, _ = next(iter(loader))
        return dict(zip(loader.sample_order(epoch).tolist(), torch.stack(views, 1), strict=True))

    e0, e1, again = views_by_sample(0), views_by_sample(1), views_by_sample(0)
    assert sorted(e0) == sorted(e1) == list(range(8))
    assert all(not torch.equal(e0[i], e1[i]) for i in e0)
    assert all(torch.equal(e0[i], again[i]) for i in e0)


def test_replay_draws_distinct_uniform_slots() -> None:
    """`draw` is sampling without replacement: distinct slots, all of them when asked for more, each slot equally
    likely (chi-square over 3,000 draws of 3 of 10 slots, a fixed seed)."""
    memory = ReservoirMemory(size=10, seed=3)
    ids = np.arange(40)
    memory.update(ids, ids % 4, np.zeros(40, dtype=np.int64), lambda i: bytes([i]))
    assert memory.draw(20).tolist() == list(range(10))
    counts = np.zeros(10)
    for _ in range(3000):
        slots = memory.draw(3)
        assert len(set(slots.tolist())) == 3, slots
        counts[slots] += 1
    assert stats.chisquare(counts).pvalue > 1e-3
    empty = ReservoirMemory(size=4, seed=0)
    assert empty.draw(2).tolist() == []


# (warm-up epochs, steps per epoch, epochs, max_steps) -> the warm-up steps written out by hand
WARMUPS = [
    ((0.5, 6, 3, None), 3),
    ((0.25, 8, 2, None), 2),
    ((2.5, 4, 5, None), 10),
    ((0.3, 10, 1, None), 3),
    ((1.0, 1, 1, None), 1),  # one step: the whole run is the warm-up
    ((3.0, 4, 5, 5), 5),  # max_steps cuts the run inside the warm-up
    ((0.0, 7, 2, None), 0),
]


@pytest.mark.parametrize(("args", "warmup"), WARMUPS)
def test_schedule_against_its_formula(args: tuple, warmup: int) -> None:
    """The LR of every step against warm-up (Goyal et al. 2017, sec. 2.2: linear from peak/W) then cosine
    (Loshchilov & Hutter 2017, Eq. 5) to final_fraction, computed here in float64."""
    warmup_epochs, spe, epochs, max_steps = args
    total = min(epochs * spe, max_steps or epochs * spe)
    overrides = [f"train.warmup_epochs={warmup_epochs}", f"train.epochs={epochs}"]
    train = config.load(None, overrides + ([f"train.max_steps={max_steps}"] if max_steps else [])).train
    assert trainer.schedule_steps(train, spe) == (total, warmup)
    cfg = config.load(None, ["optim.final_lr_fraction=0.1"]).optim
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = optim.build_scheduler(opt, cfg, total, warmup)
    for step in range(total):
        if step < warmup:
            expected = 2.0 * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            expected = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), step
        opt.step()
        sched.step()
    if warmup:
        assert opt.param_groups[0]["lr"] <= 2.0  # the warm-up never overshoots the peak


def test_one_step_profile_range(tmp_path) -> None:
    """`A-A` is one step: accepted, and the profiler records exactly that step."""
    first, last = config.profile_range("3-3")
    assert (first, last) == (3, 3)
    prof = Profiler(first, last, tmp_path, 0, torch.device("cpu"))
    for step in range(1, 6):
        prof.on_batch(step, [], torch.zeros(0))
        torch.ones(4).sum()
        prof.on_step(StepInfo(step, 0, torch.tensor(0.0), True, 1, False, step == 5))
    trace = prof.trace_path.read_text()
    assert '"step 3"' in trace and '"step 2"' not in trace and '"step 4"' not in trace
