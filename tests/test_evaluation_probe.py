"""The online linear probe (evaluation/probe.py) against a plain torch loop, its window's n and interval, its state
through a checkpoint load, and 2 ranks (with `loss.ce_weight` on a sharded engine) against one process."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from multiproc import run_ranks

from supcon_scale import config, engines, models, objectives, trainer
from supcon_scale.distributed import Context
from supcon_scale.engines import EngineSpec
from supcon_scale.evaluation.probe import OnlineProbe
from supcon_scale.hooks import StepInfo

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CTX = Context(rank=0, world_size=1, local_rank=0)
CLASSES, LR, B, SIZE = 4, 0.5, 8, 16


def _cfg(*extra: str) -> config.RunConfig:
    return config.load(
        None,
        [
            "model.encoder=test_resnet", "model.feat_dim=8", f"data.image_size={SIZE}", f"data.global_batch_size={B}",
            "optim.name=sgd", "optim.base_lr=2.0", "optim.schedule=constant", "train.warmup_epochs=0",
            "train.online_probe=true", f"train.online_probe_lr={LR}", "model.channels_last=false", *extra,
        ],
    )  # fmt: skip


def _batch(step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2)], torch.randint(0, CLASSES, (B,), generator=g)


def _info(step: int, output, labels: torch.Tensor, stepped: bool = True) -> StepInfo:
    return StepInfo(step, 0, torch.tensor(0.0), stepped, 2 * B, False, False, output, labels)


def test_probe_equals_a_plain_reference_loop():
    """Real steps of a model built as trainer.fit builds it; the probe against nn.Linear + SGD(momentum 0.9) on the
    same detached features, step for step (a skipped step trains neither); its window's top-1, n and interval."""
    from scipy.stats import binomtest

    cfg = _cfg()
    objective = objectives.build(cfg, CLASSES, CTX)
    torch.manual_seed(0)
    engine = engines.build(EngineSpec.from_run(cfg), CTX, trainer.build_model(cfg, objective), 10, 0)
    engine.train()
    (probe,) = trainer.log_feeders(cfg, engine.unwrapped().encoder.num_features, CLASSES, CTX)
    ref = torch.nn.Linear(*probe.linear.weight.shape[::-1])
    ref.load_state_dict(probe.linear.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    correct = seen = 0
    for step in range(4):
        views, labels = _batch(step)
        _, stepped, out = trainer.train_step(engine, objective, views, labels)
        assert stepped and out.features.shape == (B, 2, probe.linear.in_features) and not out.features.requires_grad
        skipped = step == 2
        probe.on_step(_info(step + 1, out, labels, stepped=not skipped))
        if skipped:
            continue
        x, y = out.features.reshape(2 * B, -1), labels.repeat_interleave(2)  # every view has its sample's label
        logits = ref(x)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        assert torch.equal(probe.linear.weight, ref.weight) and torch.equal(probe.linear.bias, ref.bias), step
    fields = probe.log_fields()
    assert fields["probe_n"] == seen == 3 * 2 * B and fields["probe_top1"] == correct / seen
    ci = binomtest(correct, seen).proportion_ci(confidence_level=0.95, method="wilson")
    assert fields["probe_top1_interval_95"] == pytest.approx([ci.low, ci.high], abs=1e-12)
    assert probe.log_fields() == {}  # a new window: nothing counted yet


def _features(step: int, n: int = 6) -> tuple[models.Output, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    out = models.Output(torch.randn(n, 2, 3, generator=g), features=torch.randn(n, 2, 5, generator=g))
    return out, torch.randint(0, CLASSES, (n,), generator=g)


def test_probe_state_round_trips_a_checkpoint_load():
    """Weights, momentum buffers and the open window's counts, saved and loaded as the checkpoint does
    (`torch.load(weights_only=True)`): the resumed probe takes the same next steps and closes the same window."""
    probe = OnlineProbe(5, CLASSES, LR, torch.device("cpu"), seed=1)
    for step in range(2):
        probe.on_step(_info(step + 1, *_features(step)))
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    resumed = OnlineProbe(5, CLASSES, LR, torch.device("cpu"), seed=2)
    assert not torch.equal(resumed.linear.weight, probe.linear.weight)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(2, 4):
        for p in (probe, resumed):
            p.on_step(_info(step + 1, *_features(step)))
    assert torch.equal(resumed.linear.weight, probe.linear.weight) and torch.equal(
        resumed.linear.bias, probe.linear.bias
    )
    assert resumed.log_fields() == probe.log_fields() and probe.seen == 0


# --- 2 ranks against one process ------------------------------------------------------------------------------


def _steps(cfg: config.RunConfig, ctx: Context, rank: int, world: int) -> dict:
    """Two steps of trainer.train_step + the probe hook on this rank's share of each global batch."""
    from supcon_scale.losses.collapse import embedding_std

    objective = objectives.build(cfg, CLASSES, ctx)
    torch.manual_seed(0)
    engine = engines.build(EngineSpec.from_run(cfg), ctx, trainer.build_model(cfg, objective), 10, 0)
    engine.train()
    probe = OnlineProbe(engine.unwrapped().encoder.num_features, CLASSES, LR, ctx.device, cfg.seed)
    n = B // world
    stds = []
    for step in range(2):
        views, labels = _batch(step)
        mine = [v[rank * n : (rank + 1) * n] for v in views], labels[rank * n : (rank + 1) * n]
        _, _, out = trainer.train_step(engine, objective, *mine)
        probe.on_step(_info(step + 1, out, mine[1]))
        stds.append(embedding_std(out.z))
    state = {k: v.detach().clone() for k, v in engine.state_dict()["model"].items() if k.startswith("classifier")}
    return {"probe": probe.state_dict()["linear"], "fields": probe.log_fields(), "classifier": state, "stds": stds}


def _uneven(rank: int, world: int) -> dict:
    """Fixed features split 2 + 6 over two ranks (no equal-batch shortcut): the probe of the 8 rows."""
    probe = OnlineProbe(5, CLASSES, LR, torch.device("cpu"), seed=3, equal_batches=False)
    for step in range(2):
        out, labels = _features(10 + step, 8)
        rows = slice(0, 8) if world == 1 else slice(0, 2) if rank == 0 else slice(2, 8)
        probe.on_step(_info(step + 1, models.Output(out.z[rows], features=out.features[rows]), labels[rows]))
    return {"probe": probe.state_dict()["linear"], "fields": probe.log_fields()}


def _plain(tree):
    """Tensors as numpy arrays: a tensor sent through the queue would be shared through the exiting rank's memory."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _ranks(rank: int, world: int, engine_name: str) -> dict:
    ctx = Context(rank=rank, world_size=world, local_rank=rank)
    cfg = _cfg(f"engine.name={engine_name}", "engine.zero_stage=0", "model.sync_bn=true", "loss.ce_weight=0.5")
    return _plain({"steps": _steps(cfg, ctx, rank, world), "uneven": _uneven(rank, world)})


@pytest.mark.parametrize("engine_name", ["fsdp", "deepspeed"])
def test_two_ranks_train_probe_and_ce_classifier_as_one_process(engine_name: str):
    """Global batch norm, SupCon + 0.5 CE on the classifier in the model (FSDP2's root unit, DeepSpeed's model), the
    probe on the gathered features: both ranks hold one process's probe, classifier and embedding std."""
    got = run_ranks(_ranks, 2, engine_name, timeout=240)
    ref = _plain(_steps(_cfg("loss.ce_weight=0.5", "model.sync_bn=true"), CTX, 0, 1))
    assert set(ref["classifier"]) == {"classifier.weight", "classifier.bias"}
    for i, rank in enumerate(got):
        steps = rank["steps"]
        for part in ("probe", "classifier") if i == 0 else ("probe",):  # the full model state is rank 0's
            for k, v in ref[part].items():
                np.testing.assert_allclose(steps[part][k], v, rtol=1e-4, atol=1e-5, err_msg=f"{part} {k}")
        assert steps["fields"]["probe_n"] == ref["fields"]["probe_n"] == 2 * 2 * B
        assert steps["stds"] == pytest.approx(ref["stds"], rel=1e-4)
    assert got[0]["steps"]["fields"] == got[1]["steps"]["fields"]  # every rank counts the same global window
    assert all(np.array_equal(got[0]["steps"]["probe"][k], got[1]["steps"]["probe"][k]) for k in ref["probe"])
    one = _plain(_uneven(0, 1))
    for rank in got:
        for k, v in one["probe"].items():
            np.testing.assert_allclose(rank["uneven"]["probe"][k], v, rtol=1e-5, atol=1e-6)
        assert rank["uneven"]["fields"] == one["fields"]


def test_a_probe_lr_without_the_probe_warns():
    with pytest.warns(UserWarning, match=r"^train.online_probe_lr only acts with train.online_probe=true$"):
        assert trainer.log_feeders(_cfg("train.online_probe=false"), 8, CLASSES, CTX) == []
