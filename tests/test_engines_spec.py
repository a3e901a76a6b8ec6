"""The engine spec (engines/spec.py) and the engine rules (engines/rules.py): each rule written once, fired from the
training config, the continual config and `engines.build` alike; the continual run's LR is its config's number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from supcon_scale import config, engines, trainer
from supcon_scale.continual import config as ccfg
from supcon_scale.continual.learner import engine_spec
from supcon_scale.distributed import Context
from supcon_scale.engines import EngineSpec

PACKAGE = Path(__file__).resolve().parents[1] / "supcon_scale"

# (overrides, device type, the refusal naming the keys, a line of the rule's source text)
RULES = [
    (
        ["precision=bf16", "data.image_size=16"],
        "cpu",
        "precision=bf16 with 16 px views",
        "on the CPU: torch's CPU bf16 convolution",
    ),
    (
        ["engine.name=deepspeed", "engine.zero_stage=3"],
        None,
        "engine.zero_stage=3 is refused",
        "is refused: it partitions parameters layer by layer",
    ),
    (
        ["engine.name=deepspeed", "engine.zero_stage=1", "optim.name=lamb"],
        None,
        "optim.name=lamb with engine.zero_stage=1",
        "tensors, so LAMB's per-tensor trust ratios would be wrong",
    ),
    (
        ["engine.name=deepspeed", "precision=fp16"],
        None,
        "precision=fp16 with engine.name=deepspeed",
        "is not supported: DeepSpeed's autocast loss scaler decides",
    ),
]


@pytest.mark.parametrize("overrides, device, message, source", RULES, ids=["cpu-bf16", "zero3", "lamb-zero", "fp16-ds"])
def test_each_engine_rule_is_written_once_and_fires_from_the_training_config(
    overrides, device, message, source, tmp_path
):
    """The rule's text is in engines/rules.py only; engines.check and trainer.fit refuse the run, writing nothing."""
    holders = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if source in p.read_text()]
    assert holders == ["engines/rules.py"]
    cfg = config.load(None, [*overrides, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(config.ConfigError, match=message):
        engines.check(EngineSpec.from_run(cfg), device)
    with pytest.raises(config.ConfigError, match=message):
        trainer.fit(cfg, Context(device=torch.device(device or "cpu")))
    assert not (tmp_path / "run").exists()
    engines.check(EngineSpec.from_run(config.load(None)), device)  # the defaults pass


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.name=deepspeed", "engine.zero_stage=3"], "engine.name=deepspeed: continual runs need replicated"),
        (["engine.name=deepspeed", "precision=fp16"], "precision=fp16 with engine.name=deepspeed"),
        (["engine.name=fsdp"], "engine.name=fsdp: continual runs need replicated parameters"),
    ],
)
def test_the_continual_config_refuses_by_the_same_rules(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        ccfg.load(None, overrides)
    ccfg.load(None, ["engine.name=deepspeed", "engine.zero_stage=2", "precision=bf16"])  # allowed


def test_build_refuses_from_the_spec():
    """A spec built without a config (as the continual run builds one) meets the same rules in engines.build."""
    spec = EngineSpec(
        engine=config.EngineConfig(name="ddp"),
        optim=config.OptimConfig(),
        precision="bf16",
        global_batch=4,
        image_size=8,
    )
    with pytest.raises(ValueError, match="precision=bf16 with 8 px views"):
        engines.build(spec, Context(), nn.Linear(3, 2), total_steps=1, warmup_steps=0)


@pytest.mark.parametrize("batches", [(10, 100), (7, 0), (3, 29)])
def test_continual_spec_steps_at_the_configured_lr_exactly(batches):
    """The step's LR is `optim.lr` as written in the config, bit for bit, whatever the incoming + replayed batch;
    the update is plain SGD at that LR (a float64 step written here)."""
    lr = 0.037  # not a power of two: a scale and its undoing would round
    cfg = ccfg.load(None, [f"optim.lr={lr}", f"stream.batch_size={batches[0]}", f"memory.batch_size={batches[1]}"])
    assert cfg.optim.lr == 0.037
    spec = engine_spec(cfg, world_size=3)
    assert spec.global_batch % 3 == 0 and spec.global_batch - sum(batches) in (0, 1, 2)
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    engine = engines.build(engine_spec(cfg, world_size=1), Context(), model, total_steps=4, warmup_steps=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    for _ in range(2):  # constant schedule: the second step's LR is the first's
        assert engine.lr == 0.037
        assert [g["lr"] for g in engine.optimizer.param_groups] == [0.037] * len(engine.optimizer.param_groups)
        before = [p.detach().clone() for p in model.parameters()]
        loss = engine(x).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        engine.backward(loss)
        assert engine.step()
        for p, p0, g in zip(model.parameters(), before, grads, strict=True):
            torch.testing.assert_close(p.detach(), p0 - 0.037 * g, rtol=0, atol=1e-15)
